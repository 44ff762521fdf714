"""How long an interrupted run takes to get going again: kill a real `llt run` with SIGKILL, then time
`llt resume` until it continues training.

    python benchmarks/resume_latency.py --kill-after 3 -- --preset demo --out /tmp/bench-runs

Everything after `--` is passed to `llt run` (it must start a new run, or continue one whose next
training has more than --kill-after epochs left). The run is killed (SIGKILL) right after its
--kill-after-th epoch event; `llt resume RUN_DIR` is then timed from process start to
    continue_seconds      the line "... continuing after epoch E of N" (data loaded, stages skipped,
                          epoch checkpoint read and checked)
    first_epoch_seconds   the end of its first epoch (including any compilation warm-up)
and compared with the same two moments of the killed process, which started cold. Prints JSON.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path for the child processes too)
from _common import machine

SRC = str(Path(__file__).resolve().parents[1] / "src")


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def watch(proc: subprocess.Popen, t0: float, kill_after: int | None) -> dict:
    """Times of: the run directory line, the 'continuing' line, each epoch event; kills after N epochs."""
    seen = {"epochs": [], "continue": None, "run_dir": None, "lines": []}

    def out_reader():
        for line in proc.stdout:
            seen["lines"].append(line.rstrip())
            if line.startswith("run directory: "):
                seen["run_dir"] = line.split(": ", 1)[1].strip()
            if "continuing after epoch" in line and seen["continue"] is None:
                seen["continue"] = time.perf_counter() - t0

    reader = threading.Thread(target=out_reader, daemon=True)
    reader.start()
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "epoch":
            seen["epochs"].append(time.perf_counter() - t0)
            if kill_after is not None and len(seen["epochs"]) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    reader.join(timeout=5)
    return seen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill-after", type=int, default=3, help="epochs the first process finishes before SIGKILL")
    ap.add_argument("--epochs-after", type=int, default=1, help="epochs the resumed process runs before it is stopped")
    ap.add_argument("run_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    t0 = time.perf_counter()
    first = watch(launch(["run", *run_args, "--jsonl"]), t0, args.kill_after)
    if not first["run_dir"] or len(first["epochs"]) < args.kill_after:
        sys.exit("the run ended before it could be killed:\n" + "\n".join(first["lines"][-10:]))
    t1 = time.perf_counter()
    second = watch(launch(["resume", first["run_dir"], "--jsonl"]), t1, args.epochs_after)
    if second["continue"] is None:
        sys.exit("the resumed run did not continue from an epoch checkpoint:\n" + "\n".join(second["lines"][-10:]))
    resumed_at = re.search(r"continuing after epoch (\d+) of (\d+)", "\n".join(second["lines"]))
    print(json.dumps({
        "benchmark": "resume_latency", "run_args": run_args, "kill_after_epochs": args.kill_after,
        "resumed_after_epoch": int(resumed_at.group(1)), "of_epochs": int(resumed_at.group(2)),
        "cold_start_first_epoch_seconds": round(first["epochs"][0], 2),
        "resume_continue_seconds": round(second["continue"], 2),
        "resume_first_epoch_seconds": round(second["epochs"][0], 2) if second["epochs"] else None,
        "run_dir": first["run_dir"], **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
