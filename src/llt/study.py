"""`llt study SPEC.yaml --out DIR`: a grid of runs (methods x controls x seeds), one command, then one report.

A spec (YAML) lists runs, seeds, and optional derived steps:

    name: demo                         # optional
    seeds: [0, 1]
    runs:
      - name: dense                    # unique; the run directory is DIR/<name>-s<seed>-<config hash>
        preset: demo
        set: [run.method=cil]          # --set overrides (a list, or a mapping field: value)
      - name: bu
        preset: demo
        set: {run.method: bu, prune.retrain_after: false}
    derived:                           # llt retrain on a finished ticket run of the same seed
      - name: bu-random-mask
        from: bu
        init: original                 # original | reference | random
        mask: random                   # ticket | random | layerwise-random

Every run is an ordinary run directory under DIR, so a second invocation skips finished runs and an
interrupted run resumes from its checkpoints. Each job runs as its own `llt` process; a job whose process
dies (a signal, a lost worker) is retried (`--retries`, default 1) and continues where it stopped; a user
error (exit status 2) is not retried. Two workers can never train the same run directory (the run lock).

Executors: `local` (default): N worker processes (`--workers`; default one per CUDA device, 1 on CPU);
`ray`: every ready job is submitted at once as a Ray task asking for `--cpus-per-job` CPUs (its threads) and
`--gpus-per-job` GPUs (default: 1 when the cluster has GPUs), and the cluster's resources decide how many run
at once, on a local Ray instance or an existing cluster (`--address`); Ray is an optional extra, imported
only here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llt.config import load_config, parse_override
from llt.registry import (REGISTRY, RETRAIN_INITS, RETRAIN_MASKS, TICKET_SEARCHES, estimate_epochs, retrain_name,
                          retrained_name)
from llt.presets import available_presets
from llt.errors import LLTError
from llt.runs import run_name
from llt.runtime import available_cpus

SPEC_KEYS = {"name", "seeds", "runs", "derived"}
RUN_KEYS = {"name", "preset", "set"}
DERIVED_KEYS = {"name", "from", "init", "mask"}


@dataclass
class Job:
    name: str                  # spec entry
    seed: int
    args: list[str]            # llt command line after `llt`
    directory: Path            # the run directory it fills
    after: str | None = None   # name of the job (entry-seed) that must finish first
    epochs: int = 0            # rough number of training epochs, for the plan
    key: str = ""

    def finished(self) -> bool:
        return (self.directory / "summary.json").is_file()

    def started(self) -> bool:
        return self.directory.is_dir() and any(self.directory.glob("stages/*.done"))


def _overrides(entry: dict, where: str) -> list[str]:
    raw = entry.get("set", [])
    if isinstance(raw, dict):
        items = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in raw.items()]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        items = list(raw)
    else:
        raise LLTError(f"{where}: 'set' must be a list of section.field=value or a mapping")
    for item in items:
        parse_override(item)
    return items


def _check_entry(entry, prefix: str, required: tuple[str, ...], allowed: set[str]) -> str:
    """The entry's name for messages ("<prefix> (<name>)"); LLTError for a missing or unknown field."""
    where = f"{prefix} ({entry.get('name', '?') if isinstance(entry, dict) else repr(entry)})"
    if not isinstance(entry, dict) or any(k not in entry for k in required):
        raise LLTError(f"{where}: needs {' and '.join(required)}")
    bad = set(entry) - allowed
    if bad:
        raise LLTError(f"{where}: unknown field(s) {', '.join(sorted(bad))} (allowed: {', '.join(sorted(allowed))})")
    return where


def load_spec(path: str | Path, out: str | Path, sets: list[str] | tuple[str, ...] = (),
              data_dir: str | None = None) -> list[Job]:
    """The jobs of a study spec, checked up front: unknown keys, presets, fields, duplicate names and
    derived steps that name no run each give a one-line error naming the entry. `sets`: overrides for
    every run of the study, after each entry's own; `data_dir`: where every job reads its data (not part
    of any run's identity, so the same study can be continued from another data folder)."""
    # absolute paths: a job may run in another working directory (a Ray worker, possibly on another machine
    # that mounts the same file system)
    path, out = Path(path), Path(out).absolute()
    data_dir = str(Path(data_dir).expanduser().absolute()) if data_dir else data_dir
    common = list(sets) + ([f"data.data_dir={json.dumps(str(data_dir))}"] if data_dir else [])
    try:
        load_config(None, common)             # unknown keys and bad values, before any entry is read
    except LLTError as e:
        raise LLTError(f"{path}: study-wide --set/--data-dir: {e}") from None
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise LLTError(f"{path}: cannot read the study spec ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LLTError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise LLTError(f"{path}: a study spec is a mapping with seeds, runs and derived")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise LLTError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(SPEC_KEYS))})")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise LLTError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    runs, derived = spec.get("runs") or [], spec.get("derived") or []
    if not isinstance(runs, list) or not runs:
        raise LLTError(f"{path}: runs must be a non-empty list")
    names = Counter(str(e.get("name")) for e in [*runs, *derived] if isinstance(e, dict))
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise LLTError(f"{path}: duplicate run name {dup[0]!r} (every entry needs its own name)")
    presets = set(available_presets())
    jobs, ticket_runs = [], {}
    for i, entry in enumerate(runs, 1):
        where = _check_entry(entry, f"{path}: runs entry {i}", ("name", "preset"), RUN_KEYS)
        preset = str(entry["preset"])
        if preset not in presets and not Path(preset).is_file():
            raise LLTError(f"{where}: unknown preset {preset!r} (see `llt show-config --list`)")
        try:
            sets = _overrides(entry, where)
            for seed in seeds:
                extra = [*sets, *common, f"run.seed={seed}", f"run.name={entry['name']}-s{seed}",
                         f"run.out_dir={json.dumps(str(out))}"]
                cfg = load_config(preset, extra)
                d = out / run_name(cfg, preset)
                jobs.append(Job(entry["name"], seed, ["run", "--preset", preset, *sum((["--set", x] for x in extra), []),
                                                      "--quiet"], d, epochs=estimate_epochs(cfg),
                                key=f"{entry['name']}-s{seed}"))
                ticket_runs[(entry["name"], seed)] = (d, cfg)
        except LLTError as e:
            raise LLTError(f"{where}: {e}") from None
    for i, entry in enumerate(derived, 1):
        where = _check_entry(entry, f"{path}: derived entry {i}", ("name", "from"), DERIVED_KEYS)
        init, mask = str(entry.get("init", "original")), str(entry.get("mask", "ticket"))
        if init not in RETRAIN_INITS or mask not in RETRAIN_MASKS:
            raise LLTError(f"{where}: init must be {', '.join(RETRAIN_INITS)}; mask {', '.join(RETRAIN_MASKS)}")
        for seed in seeds:
            if (entry["from"], seed) not in ticket_runs:
                raise LLTError(f"{where}: from {entry['from']!r} names no run of this spec")
            src, cfg = ticket_runs[(entry["from"], seed)]
            if cfg.run.method not in TICKET_SEARCHES:
                raise LLTError(f"{where}: from {entry['from']!r} is a {cfg.run.method} run, not a ticket run "
                               f"({' or '.join(TICKET_SEARCHES)})")
            if init == "reference" and not REGISTRY[cfg.run.method].keeps_reference:
                raise LLTError(f"{where}: init 'reference' needs a run that keeps a dense reference per task "
                               f"({', '.join(n for n in TICKET_SEARCHES if REGISTRY[n].keeps_reference)}); "
                               f"{entry['from']!r} is a {cfg.run.method} run")
            d = out / retrain_name(src.name, init, mask)
            args = ["retrain", str(src), "--init", init, "--mask", mask, "--out", str(out),
                    *(["--data-dir", str(data_dir)] if data_dir else []), "--quiet"]
            jobs.append(Job(entry["name"], seed, args, d, after=f"{entry['from']}-s{seed}",
                            epochs=(cfg.data.num_tasks or 5) * cfg.train.epochs, key=f"{entry['name']}-s{seed}"))
    # A run that re-trains its tickets itself (Bottom-Up with prune.retrain_after) writes its summary before that
    # re-training: the re-training is also a job of its own after it, so a study stopped during it resumes it
    # (or finds it finished) instead of counting the run as done.
    targets = {j.directory for j in jobs}
    for (name, seed), (d, cfg) in list(ticket_runs.items()):
        if REGISTRY[cfg.run.method].retrains and cfg.prune.retrain_after:
            tr = out / retrain_name(d.name, "original", "ticket")
            if tr not in targets:
                args = ["retrain", str(d), "--init", "original", "--mask", "ticket", "--out", str(out),
                        *(["--data-dir", str(data_dir)] if data_dir else []), "--quiet"]
                jobs.append(Job(f"{name}-{retrained_name(cfg.run.method)}", seed, args, tr, after=f"{name}-s{seed}",
                                epochs=(cfg.data.num_tasks or 5) * cfg.train.epochs,
                                key=f"{name}-{retrained_name(cfg.run.method)}-s{seed}"))
    # Seed-major order (every run of the first seed, then its derived steps, then the next seed): with one
    # worker, a study stopped part-way leaves whole seeds finished rather than every method half done.
    return sorted(jobs, key=lambda j: seeds.index(j.seed))


def plan(jobs: list[Job]) -> str:
    lines = [f"{'job':<28} {'state':<10} {'epochs':>7}  run directory"]
    for j in jobs:
        state = "finished" if j.finished() else ("partial" if j.started() else "new")
        lines.append(f"{j.key:<28} {state:<10} {j.epochs:>7}  {j.directory.name}")
    todo = [j for j in jobs if not j.finished()]
    lines.append(f"{len(jobs)} runs, {len(jobs) - len(todo)} finished; about {sum(j.epochs for j in todo)} training "
                 f"epochs left")
    return "\n".join(lines)


def _command(job: Job) -> list[str]:
    return [sys.executable, "-m", "llt", *job.args]


def _env(device: int | None = None, threads: int | None = None) -> dict:
    """A job's environment: llt importable from this source tree; `device`, the one CUDA device it sees;
    `threads`, its CPU threads (OMP_NUM_THREADS) unless the user set them."""
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_threads(workers: int) -> int | None:
    """CPU threads per job when several jobs share the CPU (None: torch's default). Two 2-thread torch
    processes on 2 cores slow each other by about 10x; one thread each does not."""
    import torch

    if workers <= 1 or torch.cuda.is_available():
        return None
    return max(1, available_cpus() // workers)


STOPPED = (130, 143)   # the exit status of an llt run stopped on purpose (Ctrl-C, SIGTERM): not retried


def run_job(job: Job, retries: int, log_dir: Path, device: int | None = None,
            stop: threading.Event | None = None, threads: int | None = None) -> tuple[int, str]:
    """Run one job to the end in its own process, retrying a process that died; (exit status, final SA text).
    `device`: the CUDA device the process may see (one per local worker); `threads`: its CPU threads.
    When `stop` is set, the process gets SIGTERM (it keeps its finished stages and last epoch checkpoint)
    and is not retried."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _env(device, threads)
    for _attempt in range(retries + 1):
        with open(log_dir / f"{job.key}.log", "a") as log:
            proc = subprocess.Popen(_command(job), stdout=log, stderr=subprocess.STDOUT, env=env)
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        proc.terminate()
                        rc = proc.wait()
                        break
        # done, a user error that a retry would not fix, or stopped on purpose
        if rc == 0 or rc == 2 or rc in STOPPED or (stop is not None and stop.is_set()):
            break
    sa = ""
    if rc == 0 and job.finished():
        sa = f"{json.loads((job.directory / 'summary.json').read_text())['final_sa']:.2f}"
    return rc, sa


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def write_study_record(jobs: list[Job], out: Path) -> None:
    """study.json: every job, its run directory relative to the study folder (so the folder can move and
    `llt report DIR` finds its runs from any working directory)."""
    def rel(d: Path) -> str:
        try:
            return str(Path(d).resolve().relative_to(out.resolve()))
        except ValueError:
            return str(Path(d).resolve())

    (out / "study.json").write_text(json.dumps({"jobs": [dataclasses.asdict(j) | {"directory": rel(j.directory)}
                                                         for j in jobs]}, indent=2, default=str) + "\n")


def run_study(jobs: list[Job], out: Path, workers: int = 1, retries: int = 1, executor: str = "local",
              address: str | None = None, quiet: bool = False, resources: dict | None = None) -> Outcome:
    out.mkdir(parents=True, exist_ok=True)
    write_study_record(jobs, out)
    todo = [j for j in jobs if not j.finished()]
    outcome = Outcome(done=[j.key for j in jobs if j.finished()])
    if not todo:
        print(f"study: all {len(jobs)} runs finished before; nothing to do")
        return outcome
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="study", unit="run", file=sys.stderr)
    runner = _ray_runner(address, resources or {}) if executor == "ray" else None
    if runner is not None:          # Ray schedules: every ready job is submitted, the cluster decides concurrency
        workers = len(todo)
    logs = out / "logs"
    import queue

    import torch

    slots: queue.Queue = queue.Queue()
    for i in range(max(1, workers)):
        slots.put(i if torch.cuda.is_available() and i < torch.cuda.device_count() else None)

    started_at: dict[str, float] = {}
    t_study = time.monotonic()
    stop = threading.Event()
    threads = cpu_threads(workers) if runner is None else None
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        print(f"study: {workers} workers share the {available_cpus()} CPUs this process may use: {threads} thread(s) per job "
              f"(set OMP_NUM_THREADS to choose)", flush=True)

    def one(job: Job) -> tuple[Job, int, str]:
        started_at[job.key] = time.monotonic()
        print(f"study: {'submitted' if runner else 'started'} {job.key} ({job.args[0]})", flush=True)
        if runner:
            return (job, *runner(job, retries, logs))
        slot = slots.get()
        try:
            return (job, *run_job(job, retries, logs, slot, stop, threads))
        finally:
            slots.put(slot)

    pending = list(todo)
    jobs_by_key = {j.key: j for j in todo}
    finished: set[str] = set(outcome.done)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        running = {}
        try:
            while pending or running:
                ready = [j for j in pending if j.after is None or j.after in finished]
                blocked = [j for j in pending if j.after is not None and j.after in outcome.failed]
                for j in blocked:
                    pending.remove(j)
                    outcome.failed.append(j.key)
                    print(f"study: skipped {j.key}: {j.after} failed", flush=True)
                for j in ready[: max(1, workers) - len(running)]:
                    pending.remove(j)
                    running[j.key] = pool.submit(one, j)
                if not running:
                    if pending:
                        time.sleep(0.05)
                    continue
                time.sleep(0.05)
                for key, fut in list(running.items()):
                    if fut.done():
                        try:
                            job, rc, sa = fut.result()
                        except Exception as e:       # the executor itself failed (a Ray worker or node lost
                            job, rc, sa = jobs_by_key[key], -1, ""    # past its retries): this job failed
                            first = str(e).splitlines()[0] if str(e) else ""
                            print(f"study: {key}: its executor failed: {type(e).__name__}: {first}", flush=True)
                        del running[key]
                        now = time.monotonic()
                        took = f"{now - started_at.get(key, t_study):.0f} s; study {now - t_study:.0f} s"
                        if rc == 0 and not job.finished():
                            # the job's process computed another run directory than this driver did: the llt
                            # source, a preset or a default changed while the study ran, so the config hash moved
                            outcome.failed.append(job.key)
                            print(f"study: FAILED {job.key}: it exited cleanly but {job.directory} holds no summary.json "
                                  f"(llt's code or a preset changed while the study ran, so the job wrote another run "
                                  f"directory); run the same `llt study` command again", flush=True)
                        elif rc == 0:
                            finished.add(job.key)
                            outcome.done.append(job.key)
                            print(f"study: finished {job.key}: final SA {sa} ({took})", flush=True)
                        elif rc in STOPPED:
                            outcome.failed.append(job.key)
                            print(f"study: {job.key} was stopped from outside (exit status {rc}); the same `llt study` "
                                  f"command continues it", flush=True)
                        else:
                            outcome.failed.append(job.key)
                            print(f"study: FAILED {job.key} (exit status {rc}; log: {logs / (job.key + '.log')})", flush=True)
                        if bar is not None:
                            bar.update(1)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: stop the running jobs (each keeps its checkpoints), start no new one, and
            # say how to continue; the CLI then reports the interruption with its usual exit status.
            stop.set()
            print(f"study: stopping {len(running)} running job(s); {len(outcome.done)} of {len(jobs)} runs finished; "
                  f"the same `llt study` command continues", flush=True)
            if runner is not None:
                import ray

                ray.shutdown()
            raise
    if bar is not None:
        bar.close()
    if runner is not None:
        import ray

        ray.shutdown()            # the local Ray instance (or the connection to a cluster) ends with the study
    return outcome


def _ray_runner(address: str | None, resources: dict):
    try:
        import ray
    except ImportError:
        raise LLTError("--executor ray needs Ray: pip install 'lifelong-tickets[ray]' (or pip install ray)") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    cpus = int(resources.get("cpus") or 1)
    gpus = resources.get("gpus")
    if gpus is None:                # the cluster's resources, not the driver's: a CPU-only driver may command GPUs
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    print(f"study: Ray cluster with {ray.cluster_resources().get('CPU', 0):g} CPUs and "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs; each job asks for {cpus} CPU(s) and {gpus:g} GPU(s)",
          flush=True)

    # Ray starts a task again (up to --retries times) when its worker process or node dies; run_job's own
    # retries cover the llt process. Either way the job continues from its checkpoints.
    @ray.remote(num_cpus=cpus, num_gpus=gpus)
    def remote(job: Job, retries: int, log_dir: str) -> tuple[int, str]:
        return run_job(job, retries, Path(log_dir), threads=cpus)

    def runner(job: Job, retries: int, log_dir: Path) -> tuple[int, str]:
        return ray.get(remote.options(max_retries=retries).remote(job, retries, str(log_dir)))

    return runner


def default_workers() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
