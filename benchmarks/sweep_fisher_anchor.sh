#!/usr/bin/env bash
# The sweep behind `recommended` (README, "How recommended was chosen"): FST at lr 0.005 / 100 epochs
# (the current recommended) against Fisher-anchored variants, frozen batch norm, a longer schedule and
# ASAM at its paper schedule, on every smoke attack, for two training seeds (seed 1 is held out).
#   bash benchmarks/sweep_fisher_anchor.sh OUT_DIR [extra --set ...]     (one GPU; see gpu_smoke_sweep.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: sweep_fisher_anchor.sh OUT_DIR}; shift
# Run 1 (all candidates): anchor weights 100 and 1000 make SGD unstable (loss inf: lr * w * max F > 2).
# Run 2 (SWEEP=2): the rest, plus FST at its paper lr 0.01 on the 100-epoch schedule.
if [ "${SWEEP:-1}" = 1 ]; then
export SMOOTHPURIFY_CANDIDATES='{"cand-fa10": ["recommended", {"anchor_weight": 10}],
  "cand-fa100": ["recommended", {"anchor_weight": 100}], "cand-fa1000": ["recommended", {"anchor_weight": 1000}],
  "cand-bneval": ["recommended", {"bn_mode": "eval"}], "cand-e200": ["recommended", {}],
  "cand-asam100": ["ft-sam", {}]}'
export METHODS="recommended cand-fa10 cand-fa100 cand-fa1000 cand-bneval cand-e200 cand-asam100"
else
export SMOOTHPURIFY_CANDIDATES='{"cand-fst-lr01": ["fst", {}], "cand-bneval": ["recommended", {"bn_mode": "eval"}],
  "cand-e200": ["recommended", {}], "cand-asam100": ["ft-sam", {}], "cand-fa10-lr01": ["fst", {"anchor_weight": 10}]}'
export METHODS="recommended cand-fst-lr01 cand-fa10-lr01 cand-bneval cand-e200 cand-asam100"
fi
sched=()
for m in cand-fa10 cand-fa100 cand-fa1000 cand-bneval cand-asam100 cand-fst-lr01 cand-fa10-lr01; do
    sched+=("purify.overrides.$m.epochs=100" "purify.overrides.$m.lr_step=40")
done
sched+=(purify.overrides.cand-e200.epochs=200 purify.overrides.cand-e200.lr_step=80)
for seed in ${SEEDS:-0 1}; do
    NAME=sweep_seed$seed bash benchmarks/gpu_smoke_sweep.sh "$out/seed$seed" "${sched[@]}" seed=$seed "$@" || true
done
