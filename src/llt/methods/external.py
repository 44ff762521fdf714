"""The original's interface on any file: evaluate any checkpoint (test.py), re-train any subnetwork on task k
(main_train.py), import the original's files, export a run's ticket (docs/api.md).

    llt eval --checkpoint FILE --task k [--preset P] [--pruned]
    llt retrain --weights W --mask M --task k --preset P [--teacher FILE] [--set ...]
    llt import FILE --out DIR
    llt export RUN_DIR --task k --format llt|prune|packed --out FILE [--fp32]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from llt.config import RunConfig
from llt.console import task_line
from llt.context import open_run, prepare, resolve_device
from llt.errors import LLTError
from llt.export import export_state, infer_architecture, load_ticket, rebuild
from llt.interop import convert, read_tensors
from llt.methods.base import Done, Engine, history_record, load_teaching
from llt.pruning.mask import Mask
from llt.runs import RunDir, config_hash, ensure_writable
from llt.runtime import default_eval_batch
from llt.safeload import DEFAULT_MAX_BYTES
from llt.storage import atomic_torch_save, load_checkpoint


def evaluate_checkpoint(path: str, task: int, cfg: RunConfig, pruned: bool = False,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Test accuracy on tasks 1..task of any checkpoint file, on the stream `cfg` describes. A mask in the
    file is always applied; `pruned` requires the file to carry one."""
    from llt.api import evaluate, stream_data

    stride = cfg.model.stem_stride or 1
    model, mask, info = load_ticket(path, stem_stride=stride, max_bytes=max_bytes)
    if pruned and mask is None:
        raise LLTError(f"{path}: --pruned: the file holds no mask (no weight_mask entries, not a ticket export)")
    data = stream_data(cfg)
    if task < 1 or task > data.stream.num_tasks:
        raise LLTError(f"--task must be in 1..{data.stream.num_tasks} for this stream, got {task}")
    device = resolve_device(cfg.run.device)
    model = model.to(device).eval()
    row = evaluate(model, data, task, cfg.train.eval_batch_size or default_eval_batch(device), cfg.train.precision)
    sa = sum(row) / len(row)
    density = mask.density() if mask is not None else Mask.from_nonzero(model).density()
    note = f" (skipped: {', '.join(info['skipped'])})" if info["skipped"] else ""
    print(f"task {task} checkpoint {Path(path).name} ({info['format']}): test accuracy per task "
          + " ".join(f"T{i + 1} {v:.2f}" for i, v in enumerate(row)) + f" | SA {sa:.2f} | remaining weights "
          f"{100 * density:.2f} %{note}")
    return {"row": row, "sa": sa, "density": density}


def _read_inputs(sources, max_bytes: int) -> dict[str, tuple]:
    """What each file among `sources` holds (read_tensors' result), read before anything is created or loaded:
    a damaged or hostile file is refused in one line and leaves nothing behind. Folders are read later."""
    return {str(Path(s)): read_tensors(s, max_bytes) for s in sources if s is not None and not Path(s).is_dir()}


def _external(p: Path, model, max_bytes: int, keep_orig: bool, read: dict | None) -> tuple[dict, Mask | None, list]:
    """(state, mask, skipped) of the file at `p`, from `read` when it was read already."""
    obj, skipped = (read or {}).get(str(p)) or read_tensors(p, max_bytes)
    state, mask = convert(obj, p, model, keep_orig)
    return state, mask, skipped


def _mask_of(source: str, task: int, model, max_bytes: int = DEFAULT_MAX_BYTES,
             read: dict | None = None) -> tuple[Mask, Path | None]:
    """The mask for task k: from a run directory (its masks/task{k}.pt) or a mask/checkpoint file."""
    p = Path(source)
    if p.is_dir():
        f = p / f"masks/task{task}.pt"
        if not f.is_file():
            raise LLTError(f"{p} has no mask for task {task} ({f} is missing)")
        return Mask.load(f, model), p
    _, mask, _ = _external(p, model, max_bytes, False, read)
    if mask is None:
        raise LLTError(f"{p}: holds no mask (no *weight_mask entries)")
    return mask, None


def _weights_of(source: str, model, max_bytes: int = DEFAULT_MAX_BYTES, keep_orig: bool = True,
                read: dict | None = None) -> dict:
    """The weights to start from. From a pruned file, pruned weights start at their stored weight_orig, as the
    original's main_train.py starts them (the re-training's own mask then decides what is kept); with
    keep_orig=False (a teacher) the file's own mask is applied."""
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints/init.pt"
    state, _, skipped = _external(p, model, max_bytes, keep_orig, read)
    if not state:
        raise LLTError(f"{p}: holds no weights")
    if skipped:
        print(f"{p}: skipped pickled objects: {', '.join(skipped)}")
    return state


def retrain_subnetwork(weights: str, mask_src: str, task: int, cfg: RunConfig, preset: str | None,
                       teacher: str | None = None, progress: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES,
                       into: str | Path | None = None) -> dict:
    """main_train.py: train the subnetwork (weights under mask) on task k; a run directory with the result.
    A new run directory whose set-up fails (weights, mask or teacher that do not fit) is removed again.
    `into`: the existing run directory to continue (`llt resume`), whatever config fields were added since."""
    read = _read_inputs((weights, mask_src, teacher), max_bytes)
    if into is not None:
        existed, rd = True, RunDir(into)
    else:
        ident = hashlib.sha256(json.dumps([config_hash(cfg), str(Path(weights).resolve()), str(Path(mask_src).resolve()),
                                           str(Path(teacher).resolve()) if teacher else None, task]).encode()).hexdigest()[:10]
        out = ensure_writable(cfg.run.out_dir)
        existed = (Path(out) / f"retrain-task{task}-{ident}").exists()
        rd = RunDir.create(out, f"retrain-task{task}-{ident}")
    try:
        return _retrain(rd, weights, mask_src, task, cfg, preset, teacher, progress, max_bytes, read)
    except _SetupError as e:
        if not existed:
            shutil.rmtree(rd.path, ignore_errors=True)
        raise LLTError(str(e)) from None


class _SetupError(LLTError):
    """A re-training that could not start (nothing was trained)."""


def _retrain(rd: RunDir, weights: str, mask_src: str, task: int, cfg: RunConfig, preset: str | None,
             teacher: str | None, progress: str, max_bytes: int, read: dict) -> dict:
    with rd.lock():
        t = task - 1
        teaching, teacher_name = None, None
        try:
            ctx = prepare(cfg, preset, rd=rd)
            rd.write_json("external.json", {"weights": str(weights), "mask": str(mask_src), "task": task,
                                            "teacher": teacher, "preset": preset})
            n = ctx.stream.num_tasks
            eng = Engine(ctx, cfg.train.epochs, progress)
            if not 1 <= task <= n:
                raise LLTError(f"--task must be in 1..{n} for this stream, got {task}")
            start = _weights_of(weights, eng.model, max_bytes, read=read)
            mask, mask_run = _mask_of(mask_src, task, eng.model, max_bytes, read)
            if t > 0 and cfg.teaching.enabled:
                if teacher:
                    eng.load(_weights_of(teacher, eng.model, max_bytes, keep_orig=False, read=read),
                             f"the teacher {teacher}")
                    teaching, teacher_name = eng.teaching(t), teacher
                elif mask_run is not None and (mask_run / f"teaching/task{t}.pt").is_file():
                    teacher_name = str(mask_run / f"teaching/task{t}.pt")
                    teaching = load_teaching(teacher_name, ctx.device)
                else:
                    raise LLTError(f"task {task} needs a teacher for lottery teaching: --teacher FILE, an llt run "
                                   f"directory as --mask, or --set teaching.enabled=false")
        except LLTError as e:
            if any(rd.path.glob("stages/*.done")):              # something finished: keep the directory
                raise
            raise _SetupError(str(e)) from None

        def compute() -> Done:
            eng.load(start, f"the weights {weights}")
            res = eng.fit(t, eng.schedule(), f"augment/retrain/task{task}", f"task {task}/{n} re-train", mask=mask,
                          teaching=teaching)
            eng.model.load_state_dict(res.best_state)
            assert not mask.pruned_nonzero(eng.model)
            row = eng.accuracy(t)["row"]
            print(task_line(t, n, row, f"remaining weights {100 * mask.density():.2f} %"))
            meta = {"task": task, "row": row, "density": mask.density(), "best_epoch": res.best_epoch,
                    "best_val": res.best_val}
            return Done(eng.state(), meta, mask=mask, record={**meta, "epochs": history_record(res)})

        done = eng.stage(f"task{task}", compute, event="retrain", epochs=cfg.train.epochs, masked=True,
                         skip_note=f"task {task}: re-trained before (stage marker present), skipping")
        row = done.meta["row"]
        result = {"task": task, "row": row, "sa": sum(row) / len(row), "density": done.meta["density"],
                  "weights": str(weights), "mask": str(mask_src), "teacher": teacher_name, "time": round(time.time(), 3)}
        rd.write_json("result.json", result)
        print(f"result: {rd.file('result.json')}")
        return result


def import_file(path: str, out: str, stem_stride: int = 1, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Convert an original checkpoint (or any ticket file) to llt's layout: OUT/ticket.pt and import.json."""
    model, mask, info = load_ticket(path, stem_stride, max_bytes=max_bytes)
    if mask is None:
        mask = Mask.ones(model)
    folder = ensure_writable(out)
    atomic_torch_save(folder / "ticket.pt", export_state(model, model.state_dict(), mask, "llt", source=str(path)))
    summary = {"source": str(path), "format": info["format"], "skipped": info["skipped"], "density": mask.density(),
               "architecture": {"num_tasks": model.num_tasks, "classes_per_task": model.classes_per_task,
                                "width": model.width, "stem_stride": model.stem_stride}}
    (folder / "import.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"imported {path} ({info['format']}) -> {folder / 'ticket.pt'}: remaining weights {100 * mask.density():.2f} %"
          + (f"; skipped: {', '.join(info['skipped'])}" if info["skipped"] else ""))
    return summary


def export_run(run_dir: str, task: int, fmt: str, out: str, fp32: bool = False) -> int:
    """A run's ticket (or model) of task k as a file; prints its size in bytes."""
    cfg, rd = open_run(run_dir)
    ckpt = rd.file(f"checkpoints/task{task}.pt")
    if task < 1 or not rd.stage_done(f"task{task}"):
        raise LLTError(f"{run_dir}: task {task} is not finished in this run")
    state, _ = load_checkpoint(ckpt)
    arch = infer_architecture(state, stem_stride=cfg.model.stem_stride or (2 if cfg.data.dataset == "tinyimagenet" else 1))
    model = rebuild(arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LLTError(f"{ckpt}: {str(e).splitlines()[0][:160]}") from None
    mpath = rd.file(f"masks/task{task}.pt")
    mask = Mask.load(mpath, model) if mpath.is_file() else Mask.ones(model)
    obj = export_state(model, state, mask, fmt, torch.float32 if fp32 else torch.float16,
                       config_hash=config_hash(cfg), source_run=str(rd.path), task=task)
    atomic_torch_save(out, obj)
    size = Path(out).stat().st_size
    print(f"{out}: {fmt} ticket of task {task}, remaining weights {100 * mask.density():.2f} %, {size:,} bytes")
    return size
