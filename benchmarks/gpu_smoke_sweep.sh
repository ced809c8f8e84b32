#!/usr/bin/env bash
# Candidate sweep for `recommended` on the smoke benchmark, on one GPU: every attack's row in its own
# process, all rows at once (the GPU has room), each writing its own JSON; then merged into one table.
#   METHODS="recommended cand-a cand-b" SMOOTHPURIFY_CANDIDATES='{"cand-a": ["fst", {...}]}' \
#       bash benchmarks/gpu_smoke_sweep.sh OUT_DIR [extra --set overrides...]
# Needs runs/image/cache and, where pydantic is missing, runs-gpu/wheels (see gpu_paper_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_smoke_sweep.sh OUT_DIR}; shift
source benchmarks/gpu_env.sh
mkdir -p "$out"
for attack in ${ATTACKS:-badnets blend trojan sig wanet dynamic}; do
    python benchmarks/purification_matrix.py --attacks "$attack" --methods ${METHODS:-recommended} \
        --run-dir "/tmp/sweep-$attack" --threads 2 --device-label "$device" --out "$out/rows/$attack" \
        --set purify.curve_every=0 "$@" > "$out/$attack.log" 2>&1 &
done
wait
python benchmarks/merge_matrix.py "$out/rows" "$out/${NAME:-sweep}"
