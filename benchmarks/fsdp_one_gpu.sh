#!/usr/bin/env bash
# One-GPU FSDP2 check (issue 19): train.py trainer=fsdp devices=1 (bf16) on the synthetic shapes
# data checkpoints (sharded), is killed mid-run (SIGKILL), resumes with ckpt_path=last, and its
# last checkpoint is exported and evaluated; an uninterrupted run of the same length is the
# reference for the resumed losses. Then the FSDP unit tests (gloo on the host CPU, torch of the
# image). About 3-4 minutes on an H200.
#
# On the device machine (repository root, the wheels carried as .whl):
#   run(command="bash benchmarks/fsdp_one_gpu.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=600)
# Everything lands in $OUT (default: ./fsdp_one_gpu_out): versions.txt, *.log, summary.json.
# A CPU dry run of the same steps (what was checked before it went to a GPU):
#   PY=.venv/bin/python STEPS=30 TRAINER="trainer=fsdp trainer.accelerator=cpu trainer.precision=32-true \
#     +trainer.strategy.process_group_backend=gloo" bash benchmarks/fsdp_one_gpu.sh
set -u
OUT=${OUT:-$PWD/fsdp_one_gpu_out}
mkdir -p "$OUT"
ROOT=$PWD
PY=${PY:-python3}
START=$(date +%s)
log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUT/steps.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
  export PYTHONPATH=/tmp/site:$ROOT:${PYTHONPATH:-}
else
  export PYTHONPATH=$ROOT:${PYTHONPATH:-}
fi
export PYTHONWARNINGS=ignore VLM_MAMBA_LOGS=/tmp/fsdp_runs HYDRA_FULL_ERROR=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

$PY - >"$OUT/versions.txt" 2>&1 <<'EOF'
import sys, torch, lightning
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("lightning", lightning.__version__)
import inspect
print("fit(weights_only=...)", "weights_only" in inspect.signature(lightning.Trainer.fit).parameters)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: F401
print("fsdp2 import ok")
for mod in ("mamba_ssm", "causal_conv1d", "hydra", "webdataset", "pydantic"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "MISSING", e)
EOF
cat "$OUT/versions.txt"

DATA=/tmp/fsdp_data
log "shapes data"
$PY data/generate_shapes.py --build $DATA --num-train 512 --num-val 40 --num-test 40 --vocab-size 512 \
  >"$OUT/data.log" 2>&1 || { log "data generation failed"; tail -20 "$OUT/data.log"; exit 1; }

STEPS=${STEPS:-60}
read -r -a TRAINER_ARGS <<<"${TRAINER:-trainer=fsdp}"
COMMON=(model=demo "${TRAINER_ARGS[@]}" trainer.devices=1 paths.data_dir=$DATA data=shapes_vqa
  data.batch_size=32 data.eval_batch_size=16 data.num_workers=2 module.warmup_steps=5
  module.total_steps=$STEPS module.val_generation.max_new_tokens=8 trainer.limit_val_batches=2
  trainer.val_check_interval=20 trainer.num_sanity_val_steps=1 trainer.log_every_n_steps=1
  +trainer.enable_progress_bar=false callbacks.last_checkpoint.every_n_train_steps=10
  callbacks.throughput=null test=false)

log "reference: $STEPS uninterrupted steps"
timeout 120 $PY train.py "${COMMON[@]}" trainer.max_steps=$STEPS run_name=full >"$OUT/full.log" 2>&1
echo "rc=$?" >>"$OUT/full.log"; log "reference done ($(tail -1 "$OUT/full.log"))"

log "interrupted run: SIGKILLed by itself after step 25 (last checkpoint: step 20), mid-epoch"
# tests/training/fault.py KillAtStep: a kill at a fixed step, however fast the GPU steps are
timeout 120 $PY train.py "${COMMON[@]}" trainer.max_steps=$STEPS run_name=part \
  +callbacks.fault._target_=tests.training.fault.KillAtStep +callbacks.fault.step=25 >"$OUT/part_killed.log" 2>&1
echo "rc=$? (137 = killed)" >>"$OUT/part_killed.log"
META=$VLM_MAMBA_LOGS/train/part/checkpoints/last.ckpt/meta.pt
STEP=$($PY -c "import torch; print(torch.load('$META', weights_only=True)['global_step'])" 2>/dev/null || echo none)
log "killed; last checkpoint at step $STEP ($(tail -1 "$OUT/part_killed.log"))"
ls -la "$VLM_MAMBA_LOGS/train/part/checkpoints/last.ckpt" >>"$OUT/part_killed.log" 2>&1

log "resume with ckpt_path=last"
timeout 120 $PY train.py "${COMMON[@]}" trainer.max_steps=$STEPS run_name=part ckpt_path=last >"$OUT/part_resumed.log" 2>&1
echo "rc=$?" >>"$OUT/part_resumed.log"; log "resumed run done ($(tail -1 "$OUT/part_resumed.log"))"

log "export + evaluate.py on the sharded checkpoint"
CKPT=$VLM_MAMBA_LOGS/train/part/checkpoints/last.ckpt
$PY -m vlm_mamba.export "$CKPT" /tmp/fsdp_export >"$OUT/export.log" 2>&1; echo "rc=$?" >>"$OUT/export.log"
timeout 60 $PY evaluate.py ckpt_path="$CKPT" task=vqav2 split=test data_dir=$DATA \
  hydra.run.dir=/tmp/fsdp_eval >"$OUT/evaluate.log" 2>&1
echo "rc=$?" >>"$OUT/evaluate.log"
log "export/evaluate done"

$PY - "$VLM_MAMBA_LOGS/train" /tmp/fsdp_export "$OUT/summary.json" "$STEP" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import csv, json, sys
from pathlib import Path
import torch
runs, export, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def losses(run):
    d = {}
    for f in sorted(run.rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                d[int(row["step"])] = float(row["train/loss"])
    return d

resumed_from = int(sys.argv[4]) if sys.argv[4].isdigit() else -1
full, part = losses(runs / "full"), losses(runs / "part")
part = {s: v for s, v in part.items() if s >= resumed_from}  # the steps the resumed run made
common = sorted(set(full) & set(part))
diff = max((abs(full[s] - part[s]) for s in common), default=None)
summary = {"resumed_from_step": resumed_from, "full_steps": len(full), "resumed_steps": len(part),
           "compared_steps": len(common), "max_abs_loss_diff": diff,
           "exact": diff == 0.0, "losses_full": [full[s] for s in sorted(full)],
           "losses_resumed": [part[s] for s in sorted(part)]}
try:
    from vlm_mamba.models.hub import load_checkpoint
    from vlm_mamba.models.vlm import VLMamba
    sd = load_checkpoint(runs / "part" / "checkpoints" / "last.ckpt")["state_dict"]
    model = VLMamba.from_pretrained(export)
    summary["export_equal"] = all(torch.equal(v, sd["model." + k]) for k, v in model.state_dict().items())
    full_sd = load_checkpoint(runs / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    summary["resumed_vs_full_max_weight_diff"] = max(float((sd[k].float() - full_sd[k].float()).abs().max()) for k in sd)
except Exception as e:
    summary["export_error"] = repr(e)
out.write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if not k.startswith("losses")}, indent=1))
EOF

log "FSDP unit tests (gloo on the host CPU with this torch)"
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/training/test_fsdp.py -k "even_batches or sharded_model or options" \
  >"$OUT/pytest.log" 2>&1
echo "rc=$?" >>"$OUT/pytest.log"; tail -3 "$OUT/pytest.log"
cp -r "$VLM_MAMBA_LOGS/train/part/csv" "$OUT/part_csv" 2>/dev/null || true
log "done"
