"""Triton where it is installed: it ships with CUDA builds of torch, the CPU-only build has none.

``triton`` and ``tl`` are None without it; the kernel modules (``triton_scan``, ``triton_step``)
define their kernels only when ``available()``."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = tl = None


def available() -> bool:
    return triton is not None
