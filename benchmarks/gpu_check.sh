#!/usr/bin/env bash
# One GPU call: the GPU tests named by -k selections, then the benchmark sections given, within a budget.
#   bash benchmarks/gpu_check.sh SECONDS_FOR_TESTS "PYTEST_ARGS" [BENCH_SECONDS "BENCH_ARGS"]
# Expects the wheels in .whl/ (installed to /tmp/site) and $OUT (the device tool's output folder).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLM_MAMBA_TOL_LOG=$OUT/tol.jsonl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, mamba_ssm, causal_conv1d; print('torch', torch.__version__, 'triton', triton.__version__, 'mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)" | tee -a "$OUT/device.txt"
git log -1 --format='%H %s' 2>/dev/null | cut -c1-120 | tee -a "$OUT/device.txt"
eval timeout "$1" python3 -m pytest -v -p no:cacheprovider -m gpu -rfE "$2" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | tail -60
echo "pytest exit: ${PIPESTATUS[0]}"
if [ $# -ge 4 ]; then
  timeout "$3" python3 benchmarks/bench_gpu.py $4 --time-budget $(( $3 - 20 )) --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log" | tail -40
fi
