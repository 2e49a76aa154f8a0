#!/usr/bin/env bash
# Everything this project checks on a CUDA machine, in one go (used on the lent H100; see README).
#   bash benchmarks/gpu_run.sh [OUT_DIR]
# Expects the kernels importable (pip install -e '.[cuda]'), or wheels in .whl/ (installed to /tmp/site).
set -u
OUT=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import sys, torch, mamba_ssm, causal_conv1d; print(sys.version.split()[0], 'torch', torch.__version__, 'mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)" | tee -a "$OUT/device.txt"

echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_gpu_model.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== FSDP: a short bf16 run of train.py on one GPU"
DATA=/tmp/vlm_gpu_data
python3 -c "from vlm_mamba.data.shapes import build_shapes_dataset as b; b('$DATA', n_train=800, n_val=64, n_test=64)" >/dev/null
python3 train.py experiment=demo trainer=fsdp trainer.devices=1 trainer.max_steps=30 trainer.val_check_interval=15 \
  module.val_generation.enabled=false data.num_workers=2 paths.data_dir=$DATA paths.log_dir=/tmp/vlm_gpu_runs \
  run_name=fsdp test=false 2>&1 | tee "$OUT/fsdp.log" | grep -E "Error|error|loss|strategy|precision|FSDP|Epoch|steps" | tail -20
echo "fsdp exit: ${PIPESTATUS[0]}"

echo "== benchmark: VLMamba vs parameter-matched transformer VLM (base)"
python3 benchmarks/bench_vlm.py --size base --device cuda --out "$OUT/bench_vlm_cuda.json" 2>&1 | tee "$OUT/bench_vlm.log" | tail -45
