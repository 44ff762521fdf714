#!/usr/bin/env bash
# Every class-incremental baseline preset (CIFAR-10 and CIFAR-100 versions) run from the source tree on the
# GPU machine: full width, the presets' optimiser, loss terms and memory, but on the embedded digits
# (no data to carry), 2 tasks x 2 epochs, so that one device call shows each preset trains, evaluates and
# writes its summary with the GPU image's packages only. Prints one line per preset (final SA, seconds)
# and writes them as JSON lines to ${OUT:-.}/baselines.jsonl. WIDTH=4 makes it a CPU smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-.}/baselines.jsonl
runs=$(mktemp -d)
: > "$out"
for dataset in cifar10 cifar100; do
  for m in finetune joint replay lwf ewc icarl; do
    t0=$(date +%s.%N)
    # the digits' per-image Fisher peaks near 33: the presets' lambda 100 would diverge at lr 0.01 (docs/baselines.md)
    extra=(); [ "$m" = ewc ] && extra=(--set baseline.ewc_lambda=5.0)
    python -m llt run --preset "paper-$dataset-$m" --quiet --out "$runs" --set data.dataset=digits \
      --set data.num_tasks=2 --set data.classes_per_task=2 --set data.exemplars_per_class=20 \
      --set train.epochs=2 --set "train.milestones=[1]" --set run.name="$dataset-$m" \
      --set model.width="${WIDTH:-64}" "${extra[@]}" > "$runs/$dataset-$m.log"
    python - "$runs" "$dataset-$m" "$t0" "$out" <<'PY'
import glob, json, sys, time
runs, name, t0, out = sys.argv[1:]
[summary] = glob.glob(f"{runs}/{name}-*/summary.json")
s = json.load(open(summary))
row = {"preset": f"paper-{name}", "final_sa": s["final_sa"], "seconds": round(time.time() - float(t0), 1)}
print(json.dumps(row))
open(out, "a").write(json.dumps(row) + "\n")
PY
  done
done
