"""Mamba-1's selective scan from an initial state in one CUDA kernel (forward only).

mamba_ssm's ``selective_scan_fn`` starts from zero, so a prompt prefilled from a cached image state
needed a second pass for the state's own decay (``triton_scan.add_initial_state``: at b=8, 4K tokens
it was 0.41 ms a layer plus 0.09 of dt sums, against the scan's ~1 ms). ``csrc/scan_state.cuh`` is
the scan itself, mamba_ssm's algorithm (one block per row and channel, CUB's block scan over chunks
of the sequence, the chunk's prefix carried between chunks), with the carried prefix starting at
the initial state: the state costs the loop nothing, and the last chunk's prefix is the last state.
Its numerics are mamba_ssm's (the same softplus, exp2 and order of sums); tests compare it with the
reference scan per element and with mamba_ssm's kernel from a zero state.

It is compiled on first use with ``torch.utils.cpp_extension`` (nvcc and ninja, the GPU's own
architecture; about half a minute; cached in torch's extension directory, ``TORCH_EXTENSIONS_DIR``)
and never inside a CUDA graph capture (the captures' eager warm-ups build it first). Without a CUDA
toolkit, or when the build fails, ``unavailable_reason`` says why (logged once) and the Triton forms
serve (``ops.cuda.selective_scan``). bf16 and fp32 inputs, B and C (b, n, l), d_state up to 256.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("vlm_mamba.ops")

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("scan_state.cpp", "scan_state_bf16.cu", "scan_state_fp32.cu")
HEADERS = ("scan_state.h", "scan_state.cuh")
CUDA_FLAGS = ("-O3", "--use_fast_math")
MAX_STATE = 256  # kMaxState in scan_state.h
DTYPES = (torch.bfloat16, torch.float32)

_module = None
_reason: str | None = None


def _name() -> str:
    """The extension's name, hashed from its sources, flags and torch/CUDA versions: an edited kernel
    or an upgraded torch is a new build (torch's own check covers sources and flags, not its ABI)."""
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((CSRC / f).read_bytes())
    h.update(" ".join((*CUDA_FLAGS, torch.__version__, str(torch.version.cuda))).encode())
    return f"vlm_mamba_scan_state_{h.hexdigest()[:12]}"


def load():
    """The compiled extension, built on the first call (None while a graph is being captured, or
    when it cannot be built: ``unavailable_reason``)."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    if not torch.cuda.is_available():
        _reason = "torch.cuda.is_available() is False"
        return None
    if torch.cuda.is_current_stream_capturing():
        return None  # no build inside a capture; the eager warm-ups come first
    try:
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit found (nvcc; set CUDA_HOME)")
        start = time.perf_counter()
        logger.info("building the CUDA scan from a state (once per kernel version, ~30 s)")
        _module = cpp_extension.load(
            name=_name(),
            sources=[str(CSRC / f) for f in SOURCES],
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_cflags=["-O3"],
            verbose=False,
        )
        logger.info("built the CUDA scan from a state in %.0f s", time.perf_counter() - start)
    except Exception as err:  # any build or import failure leaves the Triton forms in charge
        first = str(err).strip().splitlines()
        _reason = f"{type(err).__name__}: {first[0] if first else ''}"[:300]
        logger.warning("the CUDA scan from a state is unavailable (%s); the Triton forms serve", _reason)
        logger.debug("the build's full error:\n%s", err)
    return _module


def unavailable_reason() -> str | None:
    """None when the kernel is built (or not tried yet), else why it cannot be."""
    return _reason


def applies(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor | None) -> bool:
    """Whether a call with these arguments can take the kernel (it is not loaded here)."""
    return (
        u.is_cuda
        and u.dtype in DTYPES
        and all(t.dtype == u.dtype for t in (delta, B, C) + ((z,) if z is not None else ()))
        and B.dim() == 3
        and C.dim() == 3
        and 1 <= A.shape[1] <= MAX_STATE
        and u.shape[-1] >= 1
    )


def _unit_stride(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def selective_scan_from_state(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    h0: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """u, delta, z (b,e,l); A (e,n); B, C (b,n,l); D, delta_bias (e,); h0 (b,e,n) (None: zero).
    Returns (y (b,e,l) in u's dtype, laid out like delta; the last state (b,e,n) fp32)."""
    module = load()
    if module is None:
        why = _reason or "inside a graph capture"
        raise RuntimeError(f"the CUDA scan from a state is unavailable: {why}")
    D, delta_bias = (None if t is None else t.float().contiguous() for t in (D, delta_bias))
    u, delta, B, C, z = (_unit_stride(t) for t in (u, delta, B, C, z))
    h0 = None if h0 is None else h0.float()
    y, last = module.fwd(u, delta, A.float(), B, C, D, z, delta_bias, h0, bool(delta_softplus))
    return y, last
