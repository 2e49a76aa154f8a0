"""Compiled CPU kernels: the Mamba-1 selective scan fused over time (``csrc/selective_scan_cpu.c``).

The pure-PyTorch scan writes several ``(l, b, e, n)`` tensors per call forward and backward; on a
2-core CPU that was half of a demo training step. The C kernel keeps each (batch, channel) row's
state in registers and recomputes the states in the backward pass, so its memory traffic is the
inputs and outputs only.

It is built on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), in well
under a second, into ``$VLM_MAMBA_CACHE`` (default ``~/.cache/vlm_mamba``) under a name hashed from
the source, the flags, the compiler and the CPU, written to a temporary file and renamed, so
concurrent first uses are safe. It is loaded with ctypes, which releases the GIL during a call: a
call's batch rows are split over ``torch.get_num_threads()`` Python threads. No compiler, or a failed
build, leaves the PyTorch path in charge (``unavailable_reason`` says why; ``vlm_mamba.ops`` logs it).
Only fp32 runs here; other dtypes are computed in fp32 and cast back, fp64 goes to the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from vlm_mamba.ops import torch_ops as _torch

logger = logging.getLogger("vlm_mamba.ops")

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
CACHE_ENV = "VLM_MAMBA_CACHE"
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-std=c11")
LANES = 16  # channels per vector in the kernel (its W): e / g must be a multiple, else the PyTorch path runs
NATIVE = "-march=native"  # the build runs on the machine that uses it; dropped if the compiler refuses


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return cc if shutil.which(cc) else None
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def cxx_unavailable_reason() -> str | None:
    """None when a C++ compiler (what torch.compile's inductor builds CPU kernels with) is on the
    PATH, else a sentence saying why not (``$CXX`` wins, as for inductor)."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return None if shutil.which(cxx) else f"$CXX={cxx!r} is not an executable on the PATH"
    if any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return None
    return "no C++ compiler (g++, clang++ or c++) on the PATH"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (Linux), else the platform string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(keep) or platform.processor()
    except OSError:
        return platform.platform()


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlm_mamba"
    )
    return Path(root) / "kernels"


def _compile(cc: str, src: Path, out: Path, flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)


def build() -> Path:
    """Compile the kernel (once per source, flags, compiler and CPU) and return the shared library."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()])
    )
    out = cache_dir() / f"selective_scan_cpu-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    t0 = time.perf_counter()
    try:
        res = _compile(cc, SOURCE, tmp, [NATIVE, *FLAGS])
        if res.returncode != 0:
            res = _compile(cc, SOURCE, tmp, list(FLAGS))
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("vlm_mamba.ops: built %s with %s in %.1f s", out, cc, time.perf_counter() - t0)
    return out


@functools.cache
def load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    f32p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.vlm_scan_fwd.argtypes = [f32p] * 8 + [i64] + [f32p] * 3 + [i64] * 6
    lib.vlm_scan_bwd.argtypes = [f32p] * 8 + [i64] + [f32p] * 10 + [i64] * 6
    lib.vlm_scan_fwd.restype = lib.vlm_scan_bwd.restype = ctypes.c_int
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel builds and loads, else a sentence saying why not."""
    try:
        load()
    except Exception as err:  # no compiler, a failed build, an unloadable library
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per size and process (a forked child gets its own: the parent's threads do not fork)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm_mamba_scan")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _row_ranges(b: int) -> list[tuple[int, int]]:
    parts = max(1, min(torch.get_num_threads(), b))
    cuts = [b * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def _run(fn, ranges: list[tuple[int, int]], make_args) -> None:
    """Call ``fn(*make_args(i), b0, b1)`` for each row range, on threads when there are several."""
    if len(ranges) == 1:
        codes = [fn(*make_args(0), *ranges[0])]
    else:
        futures = [
            _pool(len(ranges), os.getpid()).submit(fn, *make_args(i), lo, hi)
            for i, (lo, hi) in enumerate(ranges)
        ]
        codes = [f.result() for f in futures]
    if any(codes):
        raise MemoryError("selective_scan_cpu: the kernel could not allocate its row buffers")


# The kernel as torch custom ops (``vlm_mamba::selective_scan_cpu`` and its backward), so that
# ``torch.compile`` keeps the whole step in one graph around it: each op has a fake (meta) function
# giving its outputs' shapes, and the forward's gradient is the backward op (``register_autograd``).
# Optional results the backward has no value for (no D, z, delta_bias or h0) come back as empty
# tensors: a custom op returns tensors only.


@torch.library.custom_op("vlm_mamba::selective_scan_cpu", mutates_args=(), device_types="cpu")
def scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, h0: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """mamba_ssm's selective scan on the C kernel, channels last; see ``csrc/selective_scan_cpu.c``.

    u, delta, z (b,l,e); A (n,e); B, C (b,g,l,n); D, delta_bias (e,); h0 (b,e,n); all fp32 on the CPU,
    e / g a multiple of ``LANES``. Returns y (b,l,e) and the last state h_l (b,e,n).
    """
    lib = load()
    u, delta, A, B, C, D, z, delta_bias, h0 = _contiguous(u, delta, A, B, C, D, z, delta_bias, h0)
    b, L, e = u.shape
    n, g = A.shape[0], B.shape[1]
    y = torch.empty_like(u)
    h_last = u.new_empty(b, e, n)
    ptrs = [_ptr(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    _run(lib.vlm_scan_fwd, _row_ranges(b), lambda i: (
        *ptrs, int(softplus), _ptr(h0), _ptr(y), _ptr(h_last), e, L, n, g,
    ))  # fmt: skip
    return y, h_last


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    b, L, e = u.shape
    return u.new_empty(b, L, e), u.new_empty(b, e, A.shape[0])


@torch.library.custom_op("vlm_mamba::selective_scan_cpu_bwd", mutates_args=(), device_types="cpu")
def scan_bwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, h0: Tensor | None, dy: Tensor, dh_last: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of :func:`scan_fwd` (the kernel recomputes the states): du, ddelta (b,l,e), dA (n,e),
    dB, dC (b,g,l,n), dD, d(delta_bias) (e,), dz (b,l,e), dh0 (b,e,n); empty (0,) where the input is None."""
    lib = load()
    u, delta, A, B, C, D, z, delta_bias, h0, dy, dh_last = _contiguous(
        u, delta, A, B, C, D, z, delta_bias, h0, dy.float(), dh_last.float()
    )
    b, L, e = u.shape
    n, g = A.shape[0], B.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    dB, dC = torch.zeros_like(B), torch.zeros_like(C)
    ranges = _row_ranges(b)
    acc = A.new_zeros(len(ranges), n + 2, e)  # per thread: dA (n rows), dD, d(delta_bias)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    ptrs = [_ptr(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    _run(lib.vlm_scan_bwd, ranges, lambda i: (
        *ptrs, int(softplus), _ptr(h0), _ptr(dy), _ptr(dh_last), _ptr(du), _ptr(ddelta), _ptr(dz),
        _ptr(acc[i]), _ptr(dB), _ptr(dC), _ptr(dh0), e, L, n, g,
    ))  # fmt: skip
    acc = acc.sum(0)  # (n+2, e); the rows are copied out: a custom op's results may not alias
    none = lambda: u.new_empty(0)  # one tensor per slot, for the same reason
    return (
        du, ddelta, acc[:n].clone(), dB, dC, acc[n].clone() if D is not None else none(),
        dz if dz is not None else none(), acc[n + 1].clone() if delta_bias is not None else none(),
        dh0 if dh0 is not None else none(),
    )  # fmt: skip


@scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, softplus, h0, dy, dh_last):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    opt = lambda t: u.new_empty(0) if t is None else like(t)
    return like(u), like(delta), like(A), like(B), like(C), opt(D), opt(z), opt(delta_bias), opt(h0)


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, h0 = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0)
    ctx.softplus = softplus


def _scan_backward(ctx, dy, dh_last):
    u, delta, A, B, C, D, z, delta_bias, h0 = ctx.saved_tensors
    grads = scan_bwd(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, h0, dy, dh_last)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = grads
    keep = lambda g, t: None if t is None else g
    return du, ddelta, dA, dB, dC, keep(dD, D), keep(dz, z), keep(dbias, delta_bias), None, keep(dh0, h0)


scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _contiguous(*ts: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in ts]


def _channels_last(x: Tensor) -> Tensor:
    """(b,e,l) -> (b,l,e) fp32 contiguous."""
    return x.float().transpose(1, 2).contiguous()


def _time_major_state(X: Tensor) -> Tensor:
    """B or C (b,n,l) | (b,g,n,l) -> (b,g,l,n) fp32 contiguous."""
    X = X.float()
    if X.dim() == 3:
        X = X[:, None]
    return X.transpose(-1, -2).contiguous()


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
    return_last_state=False,
):  # fmt: skip
    """Mamba-1 selective scan on the compiled kernel; ``selective_scan_torch``'s signature and results.

    Args: u, delta, z (b,e,l); A (e,n); B, C (b,n,l) or (b,g,n,l); D, delta_bias (e,);
    initial_state (b,e,n). Returns y (b,e,l) in u's dtype and, if asked, the last state (b,e,n) fp32.
    """
    b, e, L = u.shape
    groups = 1 if B.dim() == 3 else B.shape[1]
    if u.dtype == torch.float64 or u.device.type != "cpu" or (e // groups) % LANES:
        return _torch.selective_scan_torch(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state
        )
    n = A.shape[-1]
    h0 = None if initial_state is None else initial_state.float().contiguous()
    if h0 is not None and h0.shape != (b, e, n):
        raise ValueError(f"initial_state has shape {tuple(h0.shape)}, expected {(b, e, n)}")
    if L == 0:
        y = u.float().new_zeros(b, e, 0)
        h_last = h0 if h0 is not None else u.float().new_zeros(b, e, n)
    else:
        opt = lambda t: None if t is None else t.float().contiguous()
        y, h_last = scan_fwd(
            _channels_last(u), _channels_last(delta), A.float().t().contiguous(), _time_major_state(B),
            _time_major_state(C), opt(D), None if z is None else _channels_last(z), opt(delta_bias),
            bool(delta_softplus), h0,
        )  # fmt: skip
        y = y.transpose(1, 2)  # (b,e,l)
    y = y.to(u.dtype)
    return (y, h_last) if return_last_state else y
