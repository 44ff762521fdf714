#!/usr/bin/env bash
# The foundation issue's GPU measurements in one device call (about 2-3 minutes on an H100):
#   batched augmentation at batch 256, 32x32; model forward+backward at batch 256, bf16, channels-last,
#   eager and compiled. Runs from the source tree (no install). Writes JSON lines to ${OUT:-.}/foundation.jsonl
#   and prints a short table last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-.}/foundation.jsonl
: > "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python benchmarks/augment.py --batch 256 | python -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out"
python benchmarks/augment.py --batch 256 --channels-last --bf16 | python -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out"
for c in none max-autotune-no-cudagraphs reduce-overhead; do
  python benchmarks/model_throughput.py --batch 256 --precision bf16 --channels-last --compile "$c" \
    | python -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out"
done
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'benchmark':<24} {'variant':<34} {'images/s':>10} {'ms/batch':>9} {'MFU %':>6}")
for r in rows:
    if r["benchmark"] == "augment":
        v = f"batch {r['batch']} cl={r['channels_last']} bf16={r['bf16']}"
        print(f"{'augment':<24} {v:<34} {r['images_per_second']:>10} {r['ms_per_batch']:>9} {'':>6}")
    else:
        v = f"batch {r['batch']} {r['precision']} cl compile={r['compile']}"
        print(f"{'forward+backward':<24} {v:<34} {r['images_per_second']:>10} {r['ms_per_step']:>9} {r['mfu_percent']:>6}")
PY
