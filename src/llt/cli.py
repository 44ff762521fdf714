"""The `llt` command: parse -> RunConfig -> execute. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
import time

from llt import __version__
from llt.config import dump_yaml, load_config
from llt.configdoc import describe_fields
from llt.registry import RETRAIN_INITS
from llt.errors import LLTError
from llt.runtime import tune_allocator


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset name from configs/ (see `llt show-config --list`) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable), e.g. --set data.num_tasks=3")
    p.add_argument("--data-dir", help="shortcut for --set data.data_dir=DIR")
    p.add_argument("--cache-dir", help="shortcut for --set data.cache_dir=DIR")
    p.add_argument("--download", action="store_true", default=None, help="shortcut for --set data.download=true")
    p.add_argument("--seed", type=int, help="shortcut for --set run.seed=N")
    p.add_argument("--out", help="shortcut for --set run.out_dir=DIR")


def _add_max_bytes(p: argparse.ArgumentParser) -> None:
    from llt.safeload import DEFAULT_MAX_BYTES

    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"refuse checkpoint files that are (or unpack to) more bytes than this (default "
                        f"{DEFAULT_MAX_BYTES:,}: a few times the largest PreAct-ResNet-18 checkpoint)")


def _add_progress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", dest="progress", action="store_const", const="quiet", default="auto",
                   help="no progress display (the per-task lines and the final table only)")
    g.add_argument("--jsonl", dest="progress", action="store_const", const="jsonl",
                   help="progress as one JSON object per epoch on stderr, for machines")


def _overrides(args) -> list[str]:
    extra = []
    for flag, key in (("data_dir", "data.data_dir"), ("cache_dir", "data.cache_dir"), ("seed", "run.seed"),
                      ("out", "run.out_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            extra.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if getattr(args, "download", None):
        extra.append("data.download=true")
    return extra + list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llt", description="Lifelong lottery tickets for class-incremental learning.")
    parser.add_argument("--version", action="version", version=f"llt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a preset end to end into a run directory (reruns skip finished stages)")
    _add_config_args(p)
    _add_progress_args(p)

    p = sub.add_parser("resume", help="continue an interrupted run (finished stages are skipped, an unfinished "
                                      "training continues from its last epoch checkpoint)")
    p.add_argument("run_dir", help="a run directory written by `llt run` (or `llt retrain`)")
    p.add_argument("--data-dir", help="the data folder, if it moved since the run")
    _add_progress_args(p)

    p = sub.add_parser("eval", help="re-evaluate the stored model of task k of a run, or any checkpoint file "
                                    "(--checkpoint), on tasks 1..k")
    p.add_argument("run_dir", nargs="?", help="a run directory written by `llt run`")
    p.add_argument("--task", type=int, required=True, help="task k (1-based)")
    p.add_argument("--checkpoint", help="instead of a run: any checkpoint (llt, llt export, or the original code's), "
                                        "evaluated on the stream of --preset")
    p.add_argument("--pruned", action="store_true", help="with --checkpoint: require the file to carry a mask (a "
                                                         "mask in the file is applied with or without --pruned)")
    _add_max_bytes(p)
    p.add_argument("--preset", help="with --checkpoint: the preset whose data and stream to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="with --checkpoint: override a config field")
    p.add_argument("--data-dir", help="the data folder (if it moved since the run)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ticket", dest="which", action="store_const", const="ticket", default="ticket",
                   help="the model reported after task k: the ticket of a Top-Down/Bottom-Up run (default)")
    g.add_argument("--dense", dest="which", action="store_const", const="dense",
                   help="the dense reference of a Bottom-Up run")

    p = sub.add_parser("retrain", help="re-train the masks of a finished ticket run in isolation (TR-BU and the "
                                       "lottery controls), or any subnetwork on task k (--weights, --mask, --task)")
    p.add_argument("run_dir", nargs="?", help="a finished Bottom-Up or Top-Down run directory")
    p.add_argument("--init", default="original", choices=RETRAIN_INITS,
                   help="initialisation: the run's theta_0 (default), the previous task's dense reference (Bottom-Up "
                        "only), or random")
    p.add_argument("--mask", default="ticket",
                   help="with RUN_DIR: ticket (default), random or layerwise-random (random masks with the tickets' "
                        "kept count overall or per layer, nested across tasks like the tickets); with --weights: a "
                        "mask file, a pruned checkpoint or a run directory (its masks/task{k}.pt)")
    p.add_argument("--weights", help="re-train this subnetwork: a checkpoint, or a run directory (its theta_0)")
    p.add_argument("--task", type=int, help="with --weights: the task k to train (1-based)")
    p.add_argument("--teacher", help="with --weights and k >= 2: the checkpoint that teaches (lottery teaching)")
    p.add_argument("--preset", help="with --weights: the preset (data, stream, training)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="with --weights: override a config field")
    p.add_argument("--out", help="folder for the new run directory (default: beside the source run, or runs/)")
    p.add_argument("--data-dir", help="the data folder, if it moved since the run")
    _add_max_bytes(p)
    _add_progress_args(p)

    p = sub.add_parser("export", help="write the ticket of task k of a run as a file (llt, prune or packed layout)")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--task", type=int, required=True, help="task k (1-based)")
    p.add_argument("--format", default="packed", choices=("llt", "prune", "packed"), help="file layout (default packed)")
    p.add_argument("--fp32", action="store_true", help="packed: keep the weights in fp32 (exact) instead of fp16")
    p.add_argument("--out", required=True, help="the file to write")

    p = sub.add_parser("import", help="convert a checkpoint of the original code (or any ticket file) to llt's layout")
    p.add_argument("file", help="e.g. BU_ticket.pt, task3_best_model.pt")
    p.add_argument("--out", required=True, help="folder for ticket.pt and import.json")
    p.add_argument("--stem-stride", type=int, default=1, help="2 for 64x64 models (Tiny-ImageNet)")
    _add_max_bytes(p)

    p = sub.add_parser("study", help="run a grid of runs (methods x controls x seeds) from a YAML spec, locally or on Ray")
    p.add_argument("spec", help="the study spec (see docs/studies.md)")
    p.add_argument("--out", required=True, help="folder of the study's run directories")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, which are finished, epochs) and stop")
    p.add_argument("--executor", default="local", choices=("local", "ray"), help="local worker processes or Ray tasks")
    p.add_argument("--workers", type=int, default=0, help="local workers (default: one per CUDA device, 1 on CPU); "
                   "with --executor ray every ready job is submitted and the cluster's resources decide")
    p.add_argument("--address", help="--executor ray: the address of an existing Ray cluster (default: a local one)")
    p.add_argument("--cpus-per-job", type=int, default=1, help="--executor ray: CPUs each job asks for (its threads)")
    p.add_argument("--gpus-per-job", type=float, default=None, help="--executor ray: GPUs each job asks for (default: "
                   "1 when the cluster has GPUs, else 0)")
    p.add_argument("--retries", type=int, default=1, help="times a job whose process died is started again")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override for every run of the study (after each entry's own; repeatable)")
    p.add_argument("--data-dir", help="the data folder for every job (shortcut for --set data.data_dir=DIR)")

    p = sub.add_parser("show-config", help="print the resolved config as YAML")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its type, default and help text")
    p.add_argument("--markdown", action="store_true", help="with --fields: the tables of docs/configuration.md")
    p.add_argument("--list", action="store_true", help="list the available presets")

    p = sub.add_parser("report", help="tables and figures (Markdown, CSV, PNG) from finished runs")
    p.add_argument("run_dirs", nargs="+", help="finished run directories (runs differing only by seed are grouped)")
    p.add_argument("--out", required=True, help="folder for report.md, summary.csv and the PNG figures")

    p = sub.add_parser("list", help="the runs in a folder: method, dataset, seed, state, final SA")
    p.add_argument("folder", nargs="?", default="runs", help="folder of run directories (default: runs)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("info", help="print counts, shapes and checksum status of a dataset as JSON")
    q.add_argument("--dataset", required=True, help="cifar10, cifar100, tinyimagenet, digits or array")
    q.add_argument("--data-dir", default="data", help="folder with the dataset files")
    q.add_argument("--cache-dir", default="", help="cache folder (default $LLT_CACHE_DIR or ~/.cache/lifelong-tickets)")
    q.add_argument("--array-path", default="", help="for --dataset array: the .npz file")
    q.add_argument("--download", action="store_true", help="download missing official archives")
    q.add_argument("--require-official", action="store_true", help="refuse data that differ from the official release")
    q.add_argument("--pool", default=None, help="also describe this unlabeled pool (tinyimagenet32, builtin or a path)")
    return parser


def cmd_show_config(args) -> int:
    from llt.presets import available_presets

    if args.list:
        print("\n".join(available_presets()))
        return 0
    if args.fields:
        from llt.configdoc import fields_markdown

        print(fields_markdown() if args.markdown else describe_fields(), end="\n" if not args.markdown else "")
        return 0
    print(dump_yaml(load_config(args.preset, _overrides(args))), end="")
    return 0


def cmd_data_info(args) -> int:
    import dataclasses

    from llt.config import DataSection, _coerce
    from llt.data.sources import load_dataset, load_pool

    d = DataSection(dataset=_coerce(args.dataset, str, "--dataset"), data_dir=args.data_dir, cache_dir=args.cache_dir,
                    array_path=args.array_path, download=args.download, require_official=args.require_official)
    if d.dataset not in ("cifar10", "cifar100", "tinyimagenet", "digits", "array"):
        raise LLTError(f"--dataset: unknown dataset {d.dataset!r} (cifar10, cifar100, tinyimagenet, digits, array)")
    t0 = time.perf_counter()
    ds = load_dataset(d)
    info = ds.info()
    info["load_seconds"] = round(time.perf_counter() - t0, 3)
    if args.pool:
        _, info["pool"] = load_pool(dataclasses.replace(d, pool=args.pool), ds)
    print(json.dumps(info, indent=2))
    return 0


def cmd_run(args) -> int:
    from llt.methods.driver import run

    return run(load_config(args.preset, _overrides(args)), args.preset, progress=args.progress)


def cmd_resume(args) -> int:
    from llt.methods.driver import resume

    return resume(args.run_dir, args.data_dir, progress=args.progress)


def cmd_eval(args) -> int:
    if args.checkpoint:
        if args.run_dir:
            raise LLTError("give a run directory or --checkpoint FILE, not both")
        from llt.methods.external import evaluate_checkpoint

        evaluate_checkpoint(args.checkpoint, args.task, load_config(args.preset, _overrides(args)), args.pruned,
                            args.max_bytes)
        return 0
    if not args.run_dir:
        raise LLTError("llt eval needs a run directory or --checkpoint FILE")
    from llt.methods.driver import evaluate_run

    evaluate_run(args.run_dir, args.task, args.data_dir, args.which)
    return 0


def cmd_study(args) -> int:
    from pathlib import Path

    from llt.study import default_workers, load_spec, plan, run_study

    jobs = load_spec(args.spec, args.out, args.overrides, args.data_dir)
    print(plan(jobs))
    if args.dry_run:
        return 0
    if args.retries < 0 or args.workers < 0 or args.cpus_per_job < 1 or (args.gpus_per_job or 0) < 0:
        raise LLTError("--retries and --workers must be non-negative, --cpus-per-job at least 1, --gpus-per-job >= 0")
    outcome = run_study(jobs, Path(args.out), args.workers or default_workers(), args.retries, args.executor,
                        args.address, resources={"cpus": args.cpus_per_job, "gpus": args.gpus_per_job})
    print(f"study: {len(outcome.done)} of {len(jobs)} runs finished; report: llt report {args.out} --out REPORT_DIR")
    if outcome.failed:
        raise LLTError(f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)} (logs in {args.out}/logs)")
    return 0


def cmd_export(args) -> int:
    from llt.methods.external import export_run

    export_run(args.run_dir, args.task, args.format, args.out, args.fp32)
    return 0


def cmd_import(args) -> int:
    from llt.methods.external import import_file

    import_file(args.file, args.out, args.stem_stride, args.max_bytes)
    return 0


def cmd_report(args) -> int:
    from llt.reporting.report import report

    for path in report(args.run_dirs, args.out):
        print(path)
    return 0


def cmd_list(args) -> int:
    from llt.reporting.listing import format_runs, list_runs

    rows = list_runs(args.folder)
    print(json.dumps(rows, indent=2) if args.json else format_runs(rows))
    return 0


def cmd_retrain(args) -> int:
    if args.weights:
        if args.run_dir or args.task is None:
            raise LLTError("llt retrain --weights W --mask M --task k --preset P (no run directory)")
        from llt.methods.external import retrain_subnetwork

        cfg = load_config(args.preset, _overrides(args))
        retrain_subnetwork(args.weights, args.mask, args.task, cfg, args.preset, args.teacher, args.progress,
                           args.max_bytes)
        return 0
    if not args.run_dir:
        raise LLTError("llt retrain needs a finished ticket run directory, or --weights W --mask M --task k")
    from llt.methods.retrain import run_retrain
    from llt.registry import RETRAIN_MASKS as MASKS

    if args.mask not in MASKS:
        raise LLTError(f"--mask must be one of {', '.join(MASKS)} for a run directory, got {args.mask!r}")
    run_retrain(args.run_dir, args.init, args.mask, args.out, args.data_dir, args.progress)
    return 0


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`): unwinds like Ctrl-C, so locks are released and the
    checkpoint of the last finished epoch is written."""


def _raise_stopped(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if args.command in ("run", "resume", "retrain", "eval"):
        tune_allocator()      # reuse freed activation memory instead of page-faulting it in per batch
    if args.command in ("run", "resume", "retrain", "study") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return _dispatch(parser, args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(parser: argparse.ArgumentParser, args) -> int:
    try:
        if args.command == "show-config":
            return cmd_show_config(args)
        if args.command == "data":
            return cmd_data_info(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "resume":
            return cmd_resume(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "retrain":
            return cmd_retrain(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "study":
            return cmd_study(args)
        if args.command == "import":
            return cmd_import(args)
        if args.command == "list":
            return cmd_list(args)
        parser.error(f"unknown command {args.command}")
    except LLTError as e:
        print(f"llt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "stopped by SIGTERM" if isinstance(e, Stopped) else "interrupted"
        print(f"llt: {what}; finished stages and the last epoch checkpoint are kept: `llt resume RUN_DIR` "
              f"(or the same command) continues", file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {e.filename}" if e.filename else ""
            print(f"llt: error: no space left on the device{where}; the files of finished stages are intact "
                  f"(every file is written atomically): free some space and run the same command again", file=sys.stderr)
            return 2
        raise
    return 0
