"""Session setup shared by every test file.

On a GPU machine, mamba_ssm's Triton kernels (the SSD chunked scan of Mamba-2, the gated norm) are
autotuned: every new shape benchmarks 10-20 configurations before its first call, and the GPU
tests use many shapes, so triton's tuning took most of their time (minutes for the Mamba-2
tests). The tests check values, not speed: each autotuner keeps one configuration here, its
smallest (block sizes x stages; the first, largest, needs more shared memory than an H200 has
for fp32 inputs, which the autotuner would have skipped).
``VLM_MAMBA_TEST_AUTOTUNE=1`` keeps the full autotuning (to test the configurations a user's run
picks). Benchmarks are untouched (they do not import this file).
"""

from __future__ import annotations

import importlib
import os
import pkgutil


def _one_triton_config_per_kernel() -> int:
    """Keep the smallest config of every ``triton.autotune`` in ``mamba_ssm.ops.triton``; returns
    how many autotuners were pruned (0 without CUDA, triton or mamba_ssm)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return 0
        import mamba_ssm.ops.triton as pkg
        from triton.runtime.autotuner import Autotuner
    except Exception:  # no kernels here: nothing is autotuned
        return 0
    pruned = 0
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # a module that does not import on this install is not used either
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                obj.configs = [min(obj.configs, key=_size)]
                pruned += 1
    return pruned


def _size(config) -> tuple[int, int, int]:
    """Shared memory grows with the block sizes and the pipeline stages."""
    blocks = 1
    for v in config.kwargs.values():
        if isinstance(v, int):
            blocks *= max(v, 1)
    return blocks * (config.num_stages or 1), config.num_stages or 1, config.num_warps or 1


if os.environ.get("VLM_MAMBA_TEST_AUTOTUNE") != "1":
    _one_triton_config_per_kernel()
