#!/usr/bin/env python
"""The whole hostile corpus through every entry point; one JSON line (docs/reliability.md has the figures).

The suite (tests/test_corpus.py) sends every corpus file through the reader, `llt eval --checkpoint`,
`llt import` and `llt.load_ticket`, and a file of each kind through the entry points that load a dataset or
a run first. This script sends every file through all of them: the corpus (tests/corpus.py) is written, a
tiny Bottom-Up run is trained, and tests/corpus_child.py runs in two child processes (files given directly;
files standing in for every .pt of a copy of the run). A call passes when it is refused with one line, no
traceback, and no file appears or changes; each child's peak resident memory must stay under 1 GiB.

    PYTHONPATH=src python scripts/hostile_corpus.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write everything here (default: a temporary folder)")
    args = parser.parse_args()
    from corpus import PRESET, TINY_BU, refused_in_one_line, write_corpus

    from llt.cli import main as cli

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="llt-corpus-"))
    files = write_corpus(tmp / "files")
    if cli(["run", "--preset", "demo", "--out", str(tmp / "runs"), "--quiet", *TINY_BU]) != 0:
        return 1
    [run] = list((tmp / "runs").iterdir())
    label = {str(p): n for n, p in files.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = {"files": len(files), "calls": 0, "refused_in_one_line": 0, "failures": [], "peak_rss_bytes": {},
           "seconds": {}}
    for mode in ("file", "rundir"):
        scratch = tmp / f"scratch-{mode}"
        scratch.mkdir(exist_ok=True)
        spec = tmp / f"spec-{mode}.json"
        spec.write_text(json.dumps({"mode": mode, "files": [str(p) for p in files.values()], "run": str(run),
                                    "scratch": str(scratch), "preset_args": PRESET}))
        start = time.perf_counter()
        p = subprocess.run([sys.executable, str(REPO / "tests/corpus_child.py"), str(spec)], capture_output=True,
                           text=True, env=env)
        out["seconds"][mode] = round(time.perf_counter() - start, 1)
        if p.returncode != 0:
            out["failures"].append({"mode": mode, "child": p.stderr[-1000:]})
            continue
        result = json.loads(p.stdout.strip().splitlines()[-1])
        out["peak_rss_bytes"][mode] = result["peak_rss"]
        copy = f"{scratch / 'run'}/"
        for path, calls in result["results"].items():
            for entry, (code, text, changed, _s) in calls.items():
                first = next((line for line in text.splitlines() if line.strip()), "")
                named = (path if mode == "file" else copy) in first
                out["calls"] += 1
                if refused_in_one_line(code, text, changed, named):
                    out["refused_in_one_line"] += 1
                else:
                    out["failures"].append({"file": label[path], "entry": entry, "code": code, "changed": changed,
                                            "text": text[-300:]})
    out["entry_points"] = ["read_tensors", "load_file", "llt eval --checkpoint", "llt import", "llt.load_ticket",
                           "llt retrain --weights RUN --mask", "llt report RUN", "llt resume RUN", "llt retrain RUN",
                           "llt eval RUN"]
    bad = out["failures"] or any(v >= 1 << 30 for v in out["peak_rss_bytes"].values())
    out["failures"] = out["failures"][:20]
    print(json.dumps(out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
