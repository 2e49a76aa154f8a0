"""LanguageMamba on the CUDA kernels vs transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM``.

Where the kernels are installed, transformers calls them even for CPU tensors, so the CPU parity
tests in test_language.py skip there. Here the reference is computed in a subprocess that cannot
import mamba_ssm or causal_conv1d (both blocked in ``sys.modules`` and off its path), which makes
transformers take its pure-PyTorch path on the CPU in fp32; the checkpoint it saves is loaded with
``from_pretrained`` onto the GPU and run on the kernels (fused paths included, in training and in
eval mode). Per-element tolerances (``tests.gpu_util.close``): fp32 on both sides, TF32 off; the
SSD kernel's triton matmuls use TF32 all the same, hence Mamba-2's wider bound.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu_util import DEV, DRY, close, kernels_missing
from vlm_mamba.models.language import LanguageMamba

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(kernels_missing(), reason="needs CUDA and the mamba_ssm / causal_conv1d kernels"),
]
ROOT = Path(__file__).resolve().parents[1]

MAMBA1_CASES = [  # (config, batch, length): the CPU suite's cases plus one at a stock-like shape
    (dict(hidden_size=32, state_size=7, conv_kernel=3, time_step_rank=5, use_bias=True), 3, 13),
    (dict(hidden_size=24, state_size=16, expand=1, use_conv_bias=False), 2, 1),
    (dict(hidden_size=16, state_size=4, conv_kernel=2, num_hidden_layers=3), 1, 33),
    (dict(hidden_size=128, state_size=16), 2, 300),
]
MAMBA2_CASES = [  # fewer than on the CPU: each new shape costs the SSD kernels' autotuning (minutes)
    (dict(hidden_size=32, state_size=12, num_heads=8, head_dim=8, n_groups=2, chunk_size=8, use_bias=True), 3, 13),
    (dict(hidden_size=32, state_size=12, num_heads=8, head_dim=8, n_groups=1, chunk_size=8, use_bias=True), 3, 13),
    (dict(hidden_size=128, state_size=64, num_heads=4, head_dim=64, n_groups=1, chunk_size=64), 2, 300),
]  # fmt: skip

_REFERENCE = r"""
import json, os, sys
for name in ("mamba_ssm", "causal_conv1d", "causal_conv1d_cuda", "selective_scan_cuda"):
    sys.modules[name] = None  # import fails: transformers falls back to its PyTorch path
import importlib.util
assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None
import torch
import transformers

ssm, kw, b, L, out = json.loads(sys.argv[1])
torch.manual_seed(0)
if ssm == "mamba1":
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**{"vocab_size": 99, "num_hidden_layers": 2, **kw}))
else:
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{"vocab_size": 99, "num_hidden_layers": 2, **kw}))
g = torch.Generator().manual_seed(123)
with torch.no_grad():  # move A, D, norms and dt biases off their tidy init values
    for n, p in model.named_parameters():
        if any(k in n for k in ("A_log", ".D", "norm", "dt_bias", "dt_proj.bias")):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
model.eval().save_pretrained(out)
ids = torch.randint(0, 99, (b, L), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids).logits
# transformers up to at least 5.17 normalised Mamba-2's gated RMSNorm over the whole inner width, ignoring
# n_groups (mamba_ssm, and transformers by 5.24, normalise each group): no reference for n_groups > 1
grouped = ssm == "mamba1" or hasattr(model.backbone.layers[0].mixer.norm, "group_size")
torch.save({"ids": ids, "logits": logits, "transformers": transformers.__version__, "grouped_norm": grouped},
           os.path.join(out, "ref.pt"))
"""


def _reference(ssm, kw, b, L, tmp_path):
    """transformers' logits on its PyTorch path, computed in a process without the kernels."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not Path(p, "mamba_ssm").exists()
    )
    args = json.dumps([ssm, kw, b, L, str(tmp_path)])
    run = subprocess.run(
        [sys.executable, "-c", _REFERENCE, args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "ref.pt")


def _check(ssm, case, tmp_path, tol):
    kw, b, L = case
    ref = _reference(ssm, kw, b, L, tmp_path)
    if kw.get("n_groups", 1) > 1 and not ref["grouped_norm"]:
        pytest.skip(
            f"transformers {ref['transformers']} normalises Mamba-2's gated norm over the whole width, ignoring "
            "n_groups (mamba_ssm normalises per group, as we do): no reference for n_groups > 1; the same case "
            "with n_groups=1 runs"
        )
    ours = LanguageMamba.from_pretrained(tmp_path).to(DEV)
    ids = ref["ids"].to(DEV)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for mode in ("eval", "train"):  # train: the fused paths with autograd
            getattr(ours, mode)()
            logits = ours(ids).logits
            close(logits.cpu(), ref["logits"], *tol, f"{mode} logits vs transformers {ref['transformers']}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.skipif(DRY, reason="the reference needs a process without the kernels")
@pytest.mark.parametrize("case", range(len(MAMBA1_CASES)))
def test_logits_match_transformers_mamba_on_cuda(case, tmp_path):
    _check("mamba1", MAMBA1_CASES[case], tmp_path, (1e-3, 1e-3))


@pytest.mark.skipif(DRY, reason="the reference needs a process without the kernels")
@pytest.mark.parametrize("case", range(len(MAMBA2_CASES)))
def test_logits_match_transformers_mamba2_on_cuda(case, tmp_path):
    _check("mamba2", MAMBA2_CASES[case], tmp_path, (1e-2, 1e-2))
