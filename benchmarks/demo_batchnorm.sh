#!/usr/bin/env bash
# The lottery loop on the demo (the embedded digits), seed 0, with the default train.batchnorm=balanced and with
# train.batchnorm=original: dense CIL, Top-Down, Bottom-Up (+ TR-BU). The table of docs/results.md.
#   bash benchmarks/demo_batchnorm.sh OUT_DIR        (about 18 minutes on 2 CPU cores without native bf16)
set -euo pipefail
out=${1:?usage: benchmarks/demo_batchnorm.sh OUT_DIR}
llt=${LLT:-llt}
mkdir -p "$out"
for bn in balanced original; do
    for m in cil td bu; do
        t0=$(date +%s)
        $llt run --preset demo --out "$out" --quiet --set run.name="$m-$bn" --set run.method="$m" \
            --set train.batchnorm="$bn" > "$out/$m-$bn.log" 2>&1
        echo "$m-$bn $(( $(date +%s) - t0 )) s" | tee -a "$out/times.txt"
    done
done
$llt report "$out"/*/ --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
