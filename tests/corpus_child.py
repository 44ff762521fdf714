"""Run in a child process by tests/test_corpus.py: every file of a list through one group of llt's entry points,
each call caught; prints one JSON object: per file and entry point the exit status, the error text, the
files that appeared or changed and the seconds it took; and the process's peak resident memory (which bounds every call's).

    python corpus_child.py SPEC.json      SPEC: {"mode": "file"|"rundir", "files": [...], "run": RUN_DIR,
                                                  "scratch": DIR, "preset_args": [...], "entries": [...] (optional),
                                                  "bypass": false}

mode "file": the reader itself (`llt.safeload.read_tensors`, `llt.safeload.load_file`), `llt eval --checkpoint F`,
`llt import F`, `llt.load_ticket(F)`, `llt retrain --weights RUN --mask F`.
mode "rundir": every .pt file of a copy of RUN is replaced by F, then `llt report RUN`, `llt resume RUN`,
`llt retrain RUN` and `llt eval RUN`. With "bypass", llt's one reader is replaced by a plain
`torch.load(weights_only=True)` (what tests use to see that the corpus catches a bypassed reader).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def call(fn) -> tuple[int, str]:
    """(exit status, stderr + error text) of fn(), which returns an exit status or raises."""
    from llt.errors import LLTError

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = fn()
    except LLTError as e:
        return 2, err.getvalue() + str(e)
    except BaseException:                                   # noqa: BLE001 (a traceback is what the test catches)
        return 99, err.getvalue() + "Traceback\n" + traceback.format_exc()
    return int(code or 0), err.getvalue()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    import llt
    from llt import safeload
    from llt.cli import main as cli

    if spec.get("bypass"):
        safeload._read = lambda path, max_bytes, strict: (torch.load(path, map_location="cpu", weights_only=True), [])
    scratch, run, preset = Path(spec["scratch"]), Path(spec["run"]), spec["preset_args"]
    results = {}
    if spec["mode"] == "file":
        out = scratch / "out"
        entries = {
            "read_tensors": lambda f: [safeload.read_tensors(f), 0][1],
            "load_file": lambda f: [safeload.load_file(f), 0][1],
            "llt eval --checkpoint": lambda f: cli(["eval", "--checkpoint", f, "--task", "1", *preset]),
            "llt import": lambda f: cli(["import", f, "--out", str(out)]),
            "llt.load_ticket": lambda f: [llt.load_ticket(f), 0][1],
            "llt retrain --weights RUN --mask": lambda f: cli(["retrain", "--weights", str(run), "--mask", f, "--task", "1",
                                                                "--out", str(out), "--quiet", *preset]),
        }
        entries = {k: v for k, v in entries.items() if k in spec.get("entries", entries)}
        for f in spec["files"]:
            for name, fn in entries.items():
                before, start = listing(scratch) | listing(run), time.perf_counter()
                code, text = call(lambda: fn(f))
                after = listing(scratch) | listing(run)
                results.setdefault(f, {})[name] = [code, text, sorted(k for k in after if after[k] != before.get(k)),
                                                   time.perf_counter() - start]
    else:
        copy = scratch / "run"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        report = scratch / "report"
        entries = {
            "llt report RUN": lambda: cli(["report", str(copy), "--out", str(report)]),
            "llt resume RUN": lambda: cli(["resume", str(copy), "--quiet"]),
            "llt retrain RUN": lambda: cli(["retrain", str(copy), "--out", str(scratch / "retrained"), "--quiet"]),
            "llt eval RUN": lambda: cli(["eval", str(copy), "--task", "1"]),
        }
        entries = {k: v for k, v in entries.items() if k in spec.get("entries", entries)}
        targets = sorted(copy.rglob("*.pt"))
        for f in spec["files"]:
            data = Path(f).read_bytes()
            for t in targets:
                t.write_bytes(data)
            for name, fn in entries.items():
                before, start = listing(scratch), time.perf_counter()
                code, text = call(fn)
                after = listing(scratch)
                results.setdefault(f, {})[name] = [code, text, sorted(k for k in after if after[k] != before.get(k)),
                                                   time.perf_counter() - start]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"results": results, "peak_rss": peak}))


if __name__ == "__main__":
    main()
