#!/usr/bin/env bash
# The reliability issue's GPU measurements in one device call (about 4-6 minutes on an H100):
#   per-epoch checkpoint overhead on the heaviest training of paper-cifar10-bu (task-5 distillation
#   epoch, full width, 5 % mask), eager and compiled; time to read and restore a checkpoint; and the
#   time for `llt resume` to continue a SIGKILLed run (paper-cifar10-bu on the real CIFAR-10 when
#   ~/data holds it, see scripts/device_data.sh; otherwise the built-in digits at full width).
# Writes JSON lines to ${OUT:-.}/checkpoint.jsonl and prints a short table last.
# CKPT_ARGS / RESUME_ARGS replace the arguments (a quick CPU check of the script:
#   CKPT_ARGS="--width 8 --new-images 900 --per-class 10 --epochs 3 --repeats 1" \
#   RESUME_ARGS="--preset demo --out /tmp/llt-resume-bench" bash benchmarks/gpu_checkpoint.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-.}/checkpoint.jsonl
: > "$out"
one() { python "$@" | python -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' >> "$out"; }
ckpt=(${CKPT_ARGS:---epochs 6 --repeats 3})
one benchmarks/checkpoint_overhead.py --write-only --repeats 5
one benchmarks/writer_gil.py
one benchmarks/checkpoint_overhead.py "${ckpt[@]}"
if python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  one benchmarks/checkpoint_overhead.py "${ckpt[@]}" --compile
fi
if [ -n "${RESUME_ARGS:-}" ]; then
  resume=(${RESUME_ARGS})
elif [ -d ~/data/cifar-10-batches-py ]; then
  resume=(--preset paper-cifar10-bu --data-dir ~/data --out /tmp/llt-resume-bench)
else
  resume=(--preset demo --set model.width=64 --out /tmp/llt-resume-bench)
fi
rm -rf /tmp/llt-resume-bench
one benchmarks/resume_latency.py --kill-after 3 -- "${resume[@]}"
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["benchmark"] == "checkpoint_write":
        print(f"full training state, width {r['width']}: {r['checkpoint_mb']} MB, snapshot {r['snapshot_ms']} ms on the "
              f"training thread, write {r['write_seconds']:.3f} s in the background")
    elif r["benchmark"] == "writer_gil":
        print(f"GIL: a Python thread keeps {r['torch_save_to_path']['main_thread_speed_percent']} % of its speed during a "
              f"checkpoint save (to a path; {r['torch_save_to_buffer_then_file']['main_thread_speed_percent']} % through a buffer)")
    elif r["benchmark"] == "checkpoint_overhead":
        print(f"compile={r['compile']!s:<5} epoch {r['epoch_seconds_without']:.3f} s | checkpoint {r['checkpoint_mb']} MB: "
              f"+{r['extra_seconds_per_checkpoint'] * 1000:.1f} ms per epoch = {r['overhead_percent']} % "
              f"(snapshot {r['snapshot_ms']} ms, background write {r['write_seconds']:.3f} s, dropped {r['dropped']}) | "
              f"resume: read {r['resume_load_seconds']:.3f} s + restore {r['resume_restore_seconds']:.3f} s")
    else:
        print(f"llt resume {' '.join(r['run_args'][:2])}: continues after {r['resume_continue_seconds']} s, first epoch "
              f"done after {r['resume_first_epoch_seconds']} s (cold start: first epoch after "
              f"{r['cold_start_first_epoch_seconds']} s)")
PY
