#!/usr/bin/env bash
# Mammoth's seq-CIFAR-10 protocol on the GPU machine, llt's figures beside Mammoth's published table.
#
# One device call, with the CIFAR-10 parts carried in .device-data/ (git-ignored, 56 MB):
#     mkdir -p .device-data && cp -r ../shared/data/{unpack.py,cifar10-batches.meta,cifar10-batch-headers,cifar10-jpeg.npz} .device-data/
#     run: bash benchmarks/gpu_seq_cifar10.sh            carry: [".device-data"]     timeout_s: 600
# It unpacks CIFAR-10 (no pool: these presets use none) into ~/data, starts every preset named in $PRESETS
# (default: ER and DER++ at a memory of 200, then iCaRL-200, ER-500, DER++-500) as parallel processes (the eager
# step is bound by the host, about 11 ms a step: several runs share the GPU well), waits up to $WAIT seconds
# (default 540), then prints one line per preset: llt's final class-IL accuracy (or how far it got) beside
# Mammoth's. Runs keep going after the call returns while the machine is held; calling the script again (same
# machine) starts nothing new that is running or finished and prints the table again. JSON lines go to
# ${OUT:-.}/seq_cifar10.jsonl. The whole protocol (5 tasks x 50 epochs, batch 32 + 32) is about 70,000 steps
# per method.
#
# CPU smoke test of the same script: WIDTH=4 EPOCHS=1 TASK_SET="--set data.dataset=digits" DATA_DIR=none bash benchmarks/gpu_seq_cifar10.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
presets=${PRESETS:-"seq-cifar10-er-200 seq-cifar10-derpp-200 seq-cifar10-icarl-200 seq-cifar10-er-500 seq-cifar10-derpp-500"}
runs=${RUNS:-$HOME/seq-runs}
out=${OUT:-.}/seq_cifar10.jsonl
data=${DATA_DIR:-$HOME/data}
mkdir -p "$runs"
if [ "$data" != none ] && [ ! -d "$data/cifar-10-batches-py" ]; then
  [ -f .device-data/unpack.py ] || { echo "no CIFAR-10 under $data and no .device-data/ carried (see the header)"; exit 2; }
  python .device-data/unpack.py --out "$data" --skip-pool > /dev/null || exit 2
fi
extra=()
[ -n "${WIDTH:-}" ] && extra+=(--set model.width="$WIDTH")
[ -n "${EPOCHS:-}" ] && extra+=(--set train.epochs="$EPOCHS")
[ -n "${TASK_SET:-}" ] && extra+=(${TASK_SET})
[ "$data" != none ] && extra+=(--data-dir "$data")
tag="${WIDTH:+-w$WIDTH}${EPOCHS:+-e$EPOCHS}"      # a smoke test's runs never stand for the protocol's
for p in $presets; do
  name="$p$tag"
  if pgrep -f "run.name=$name " > /dev/null || ls "$runs"/$name-*/summary.json > /dev/null 2>&1; then continue; fi
  setsid nohup python -m llt run --preset "$p" --out "$runs" --quiet --set run.name="$name" "${extra[@]}" \
    > "$runs/$name.log" 2>&1 < /dev/null &
done
deadline=$(( $(date +%s) + ${WAIT:-540} ))
while [ "$(date +%s)" -lt "$deadline" ] && pgrep -f "llt run --preset seq-cifar10" > /dev/null; do sleep 10; done
python - "$runs" "$out" "$tag" $presets <<'PY'
import glob, json, os, subprocess, sys
runs, out, tag, presets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# Mammoth's seq-CIFAR-10 class-IL accuracy (%), Buzzega et al. 2020, Table 2 / Mammoth's README
mammoth = {"seq-cifar10-er-200": 44.79, "seq-cifar10-er-500": 57.74, "seq-cifar10-icarl-200": 49.02,
           "seq-cifar10-icarl-500": 47.55, "seq-cifar10-derpp-200": 64.88, "seq-cifar10-derpp-500": 72.70,
           "seq-cifar10-der-200": 61.93, "seq-cifar10-der-500": 70.51, "seq-cifar10-joint": 92.20,
           "seq-cifar10-sgd": 19.62}
with open(out, "w") as f:
    for p in presets:
        row = {"preset": p, "mammoth_class_il": mammoth.get(p)}
        name = p + tag
        done = glob.glob(f"{runs}/{name}-*/summary.json")
        tasks = [json.loads(l) for d in glob.glob(f"{runs}/{name}-*/records.jsonl") for l in open(d)]
        tasks = [t for t in tasks if t.get("event") == "task"]
        if done:
            s = json.load(open(done[0]))
            row.update(state="finished", llt_final_sa=round(s["final_sa"], 2),
                       llt_learning_accuracy=s.get("mean_learning_accuracy_incremental"),
                       seconds=round(sum(t.get("seconds", 0) for t in tasks), 1))
        else:
            alive = subprocess.run(["pgrep", "-f", f"run.name={name} "], capture_output=True).returncode == 0
            state = f"{len(tasks)} of 5 tasks" if tasks else "no task finished"
            log = f"{runs}/{name}.log"
            row.update(state=("running: " if alive else f"stopped, see {log}: ") + state,
                       llt_sa_so_far=round(tasks[-1]["sa"], 2) if tasks else None)
        f.write(json.dumps(row) + "\n")
        print(f"{p:<24} Mammoth {row['mammoth_class_il']!s:>6}  llt {row.get('llt_final_sa', '-')!s:>6}  {row['state']}")
PY
