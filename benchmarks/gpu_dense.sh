#!/usr/bin/env bash
# The dense issue's speed measurements in one device call (random data of CIFAR-10 shapes):
#   seconds per task-1 epoch and per distillation epoch (eager and compiled), images/s, MFU;
#   lottery-teaching query + teacher logits on a 100,000-image pool with 200 and 800 exemplars.
# Writes JSON lines to ${OUT:-.}/dense.jsonl and prints a short table last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-.}/dense.jsonl
: > "$out"
one() { python "$@" | python -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out"; }
one benchmarks/train_epoch.py --epochs 3
one benchmarks/train_epoch.py --epochs 3 --compile
one benchmarks/teaching_query.py --pool 100000 --exemplars 200 800
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["benchmark"] == "train_epoch":
        print(f"compile={r['compile']!s:<5} task-1 epoch {r['task1_epoch_seconds']:.3f} s ({r['task1_images_per_second']} img/s, "
              f"MFU {r['task1_mfu_percent']} %) | distill epoch {r['distill_epoch_seconds']:.3f} s "
              f"({r['distill_images_per_second']} img/s, MFU {r['distill_mfu_percent']} %)")
    else:
        for n, v in r["results"].items():
            print(f"teaching query + logits, pool {r['pool']}, {n} exemplars: {v['seconds']:.2f} s ({v['selected']} selected)")
PY
