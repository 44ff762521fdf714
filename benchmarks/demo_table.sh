#!/usr/bin/env bash
# Every method on the demo (the embedded digits), seed 0, one after the other: the table of docs/results.md.
#   bash benchmarks/demo_table.sh OUT_DIR        (about 10 minutes on 2 CPU cores)
set -euo pipefail
out=${1:?usage: benchmarks/demo_table.sh OUT_DIR}
llt=${LLT:-llt}
run() { local name=$1; shift; local t0=$(date +%s.%N)
        $llt run --preset demo --out "$out" --quiet --set run.name="$name" "$@" > "$out/$name.log" 2>&1
        echo "$name $(echo "$(date +%s.%N) - $t0" | bc) s" | tee -a "$out/times.txt"; }
mkdir -p "$out"
run cil --set run.method=cil
run td --set run.method=td
run bu --set run.method=bu            # with its TR-BU re-training (prune.retrain_after in the preset)
run finetune --set run.method=finetune
run joint --set run.method=joint      # the upper bound: every seen image once per epoch
run replay --set run.method=replay    # replay_batching auto = balanced
run replay-concat --set run.method=replay --set baseline.replay_batching=concat
run replay-herding --set run.method=replay --set data.exemplar_selection=herding
run replay-concat-herding --set run.method=replay --set baseline.replay_batching=concat --set data.exemplar_selection=herding
run lwf --set run.method=lwf          # ce_scope auto = local
run lwf-global --set run.method=lwf --set baseline.ce_scope=global
run ewc --set run.method=ewc          # lambda 20 (the demo preset)
run icarl --set run.method=icarl
run derpp --set run.method=derpp      # alpha 0.2, beta 0.5, der_logits all (the default)
run derpp-seen --set run.method=derpp --set baseline.der_logits=seen
run der --set run.method=der
run der-alpha1 --set run.method=der --set baseline.der_alpha=1.0
run erace --set run.method=erace
$llt report "$out"/*/ --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
