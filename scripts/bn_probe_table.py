#!/usr/bin/env python3
"""The validation table of a BatchNorm probe study (studies/cifar10-bn-probe.yaml), from its records only.

    python scripts/bn_probe_table.py STUDY_DIR

Per run: its BatchNorm settings, the validation accuracy of each task right after learning it (the newest
task's entry of the kept epoch's validation row) and their mean over tasks 2..T, and the validation accuracy
over every seen class after the last task (what epoch selection maximises). No test-set figure is read:
the probe decides on validation images only.
"""
import json
import sys
from pathlib import Path


def rows(study: Path):
    for d in sorted(p for p in study.iterdir() if (p / "records.jsonl").is_file() and (p / "manifest.json").is_file()):
        train = json.loads((d / "manifest.json").read_text())["config"]["train"]
        tasks = {}
        for line in open(d / "records.jsonl"):
            r = json.loads(line)
            if r.get("event") == "task":
                tasks[r["task"]] = r                      # a task repeated after a crash: its last record
        if not tasks:
            continue
        newest = [tasks[t]["epochs"][tasks[t]["best_epoch"] - 1]["val_row"][-1] for t in sorted(tasks)]
        la = sum(newest[1:]) / max(len(newest) - 1, 1)
        yield (d.name, train.get("batchnorm", "original"), train.get("bn_running", "auto"),
               bool(train.get("bn_recalibrate")), newest, la, tasks[max(tasks)]["best_val"])


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print("| run | batchnorm | bn_running | bn_recalibrate | val. acc. of each task right after learning it (%) "
          "| mean, tasks 2..T | val. acc., every seen class, after the last task (%) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, bn, running, recal, newest, la, last in rows(Path(argv[0])):
        print(f"| {name} | {bn} | {running} | {str(recal).lower()} | {' / '.join(f'{v:.1f}' for v in newest)} "
              f"| {la:.2f} | {last:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
