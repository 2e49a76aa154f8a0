#!/usr/bin/env bash
# Run several demo probes side by side (one GPU is plenty: the demo model is 1M parameters).
#   bash benchmarks/demo_sweep.sh SPEC [OUT_DIR]
# SPEC: one run per line, "name|time_limit_s|demo_probe.py arguments", e.g.
#   lr1e-3_s1|400|--lr 1e-3 --seed 1 --data-seed 1 --steps 1800 data.num_workers=1
# Each run writes OUT_DIR/<name>.json (after every evaluation, so a run cut by its limit keeps
# what it measured) and OUT_DIR/<name>.log. Wheels in .whl/ are installed to /tmp/site first
# (the lent GPU machine, see benchmarks/gpu_run.sh).
set -u
SPEC=$1
OUT=${2:-${OUT:-benchmarks/results/demo_sweep}}
DATA=${DATA:-/tmp/shapes}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -c "from vlm_mamba.data.shapes import build_shapes_dataset as b; b('$DATA')" > "$OUT/data.log" 2>&1
while IFS='|' read -r name limit args; do
  [ -z "$name" ] && continue
  # shellcheck disable=SC2086  # the arguments are meant to split
  timeout "$limit" python3 benchmarks/demo_probe.py --name "$name" --data "$DATA" --out "$OUT" $args \
    > "$OUT/$name.log" 2>&1 &
done < "$SPEC"
wait
grep -h "^\[" "$OUT"/*.log | sort -s -t' ' -k1,1
