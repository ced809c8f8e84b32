#!/usr/bin/env bash
# The sweep behind `recommended` = FST + distillation (README, "How recommended was chosen"): FST at
# lr 0.005 / 100 epochs (the previous recommended) against FST plus knowledge distillation from the
# model as received, on the clean batch, at a few weights and with one other choice changed at a
# time; every smoke attack, training seeds 0 and 1 at once (seed 1 is held out), one process per row.
# Rows are written after each method, so a row cut by ROW_TIMEOUT (s) keeps what it finished.
# With PAPER=1 also the paper profile's PreActResNet-18 (full Fashion-MNIST) on badnets and blend.
#   bash benchmarks/sweep_distill.sh OUT_DIR [extra --set ...]          (one GPU, 16 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: sweep_distill.sh OUT_DIR}; shift
source benchmarks/gpu_env.sh
export SMOOTHPURIFY_CANDIDATES='{
  "c-kd05": ["recommended", {"distill_weight": 0.5}],
  "c-kd1": ["recommended", {"distill_weight": 1.0}],
  "c-kd2": ["recommended", {"distill_weight": 2.0}],
  "c-kd1-t4": ["recommended", {"distill_weight": 1.0, "distill_temperature": 4.0}],
  "c-kd1-lr01": ["recommended", {"distill_weight": 1.0, "lr": 0.01}],
  "c-kd1-a05": ["recommended", {"distill_weight": 1.0, "feature_shift_weight": 0.5}],
  "c-kd1-bneval": ["recommended", {"distill_weight": 1.0, "bn_mode": "eval"}],
  "c-ftinit-kd1": ["ft-init", {"distill_weight": 1.0, "lr": 0.005}],
  "c-kd1-a1": ["recommended", {"distill_weight": 1.0, "feature_shift_weight": 1.0}],
  "c-kd2-a1": ["recommended", {"distill_weight": 2.0, "feature_shift_weight": 1.0}]}'
# Run 1: the first eight; run 2 (CANDS="c-kd1-a1 c-kd2-a1 c-kd1-a05", no dynamic): a stronger shift.
cands=${CANDS:-"c-kd1 c-kd2 c-kd05 c-kd1-a05 c-kd1-lr01 c-kd1-bneval c-kd1-t4 c-ftinit-kd1"}
sched=()
for m in $cands; do sched+=("purify.overrides.$m.epochs=100" "purify.overrides.$m.lr_step=40"); done
mkdir -p "$out"
for seed in ${SEEDS:-0 1}; do
    for attack in ${ATTACKS:-badnets blend trojan sig wanet dynamic}; do
        timeout "${ROW_TIMEOUT:-480}" python benchmarks/purification_matrix.py --attacks "$attack" --methods ${METHODS:-recommended $cands} \
            --run-dir "/tmp/sweep-$seed-$attack" --threads 1 --device-label "$device" \
            --out "$out/seed$seed/rows/$attack" --set purify.curve_every=0 seed=$seed "${sched[@]}" "$@" \
            > "$out/seed$seed-$attack.log" 2>&1 &
    done
done
if [ "${PAPER:-0}" = 1 ]; then
    for attack in badnets blend; do
        timeout "${ROW_TIMEOUT:-480}" python benchmarks/purification_matrix.py --profile paper --attacks "$attack" \
            --methods ${PAPER_METHODS:-recommended c-kd1 c-kd2} --run-dir "/tmp/paper-$attack" --threads 2 \
            --device-label "$device" --out "$out/paper/rows/$attack" --set image.dataset=fashion_mnist \
            image.data_path=null image.train.epochs=20 purify.curve_every=0 "${sched[@]}" "$@" \
            > "$out/paper-$attack.log" 2>&1 &
    done
fi
wait
for d in "$out"/seed* "$out"/paper; do
    [ -d "$d/rows" ] && python benchmarks/merge_matrix.py "$d/rows" "$d/sweep" > /dev/null || true
done
