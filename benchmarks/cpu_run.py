"""A whole llt run on the CPU: wall, user and system time, and the share of it spent evaluating.

    python benchmarks/cpu_run.py --data-dir DIR [--precision auto|fp32] [--out DIR] [--compare SUMMARY.json]
                                 [-- extra llt run arguments]

Runs, in this process, the cifar10-small replay setting of issue 19 (real CIFAR-10, 200 training images per
class, width 16, 6 epochs, batch 32, lr 0.05, 20 exemplars per class, seed 0):

    llt run --preset paper-cifar10-replay --data-dir DIR --set model.width=16 --set data.train_per_class=200
            --set data.exemplars_per_class=20 --set train.epochs=6 --set "train.milestones=[4]"
            --set train.batch_size=32 --set train.lr=0.05 --set run.seed=0 --set run.device=cpu

Evaluation time is the time inside llt.evaluation.predict (every validation and test pass goes through it).
With --compare, says whether the accuracy matrix equals that of another run's summary.json. Run it with
OMP_NUM_THREADS=1 to reproduce the one-thread figures. Prints JSON.
"""

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import machine

import llt.evaluation as evaluation
from llt.cli import main as llt_main

SETTING = ["--preset", "paper-cifar10-replay", "--set", "model.width=16", "--set", "data.train_per_class=200",
           "--set", "data.exemplars_per_class=20", "--set", "train.epochs=6", "--set", "train.milestones=[4]",
           "--set", "train.batch_size=32", "--set", "train.lr=0.05", "--set", "run.seed=0", "--set", "run.device=cpu"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--out", default=None, help="runs folder (default: a fresh temporary folder)")
    ap.add_argument("--compare", default=None, help="a summary.json whose accuracy matrix this run should equal")
    ap.add_argument("extra", nargs="*", help="further llt run arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="llt-cpu-run-"))
    spent = [0.0, 0]
    predict = evaluation.predict

    def timed_predict(model, images, *a, **kw):
        t0 = time.perf_counter()
        try:
            return predict(model, images, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += int(images.shape[0])

    evaluation.predict = timed_predict
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):      # llt's own lines to stderr: stdout is the JSON
        code = llt_main(["run", *SETTING, "--data-dir", args.data_dir, "--set", f"train.precision={args.precision}",
                         "--out", str(out), "--quiet", *args.extra])
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if code != 0:
        sys.exit(code)
    [rd] = [p for p in out.iterdir() if p.is_dir() and (p / "summary.json").is_file()]
    summary = json.loads((rd / "summary.json").read_text())
    runtime = json.loads((rd / "manifest.json").read_text()).get("runtime")
    result = {"benchmark": "cpu_run", "precision": args.precision, "runtime": runtime,
              "wall_seconds": round(wall, 1), "user_seconds": round(r1.ru_utime - r0.ru_utime, 1),
              "system_seconds": round(r1.ru_stime - r0.ru_stime, 1),
              "system_share": round((r1.ru_stime - r0.ru_stime) / wall, 3),
              "evaluation_seconds": round(spent[0], 1), "evaluation_share": round(spent[0] / wall, 3),
              "evaluated_images": spent[1], "final_sa": summary["final_sa"],
              "accuracy_matrix": summary["accuracy_matrix"], "run_dir": str(rd)}
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        result["same_accuracy_matrix_as_compare"] = other["accuracy_matrix"] == summary["accuracy_matrix"]
    print(json.dumps({**result, **machine()}, indent=2))


if __name__ == "__main__":
    main()
