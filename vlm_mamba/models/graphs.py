"""CUDA graphs for fixed-shape inference calls: the VLM's image prefill and its prompt prefill.

At small batches the VLM's prefill is launch-bound, not GPU-bound: on an H200 at b=1 with 256
prompt tokens, ``generate``'s prefill spent 84 ms of CPU time (profiled) for 4.4 ms of GPU work,
mostly the per-call Python of mamba_ssm's autograd Functions and triton launchers in the vision
encoder (27.6 ms) and the image's LM prefill (13.9 ms). A graph replays such a call as one launch.

:class:`GraphCache` (one per model, weakly keyed) captures a function of tensors once per input
signature (shapes, dtypes, device, autocast state, the weights' storage), the second time the
signature is seen, and replays it: inputs are
copied into static buffers, the graph replays, and the outputs are returned as clones (so a later
replay, or another graph of the same memory pool, never changes what a caller holds). Captures warm
up twice on a side stream first (cuBLAS workspaces, triton autotuning outside the capture). A
function that cannot be captured (a host sync, an op that refuses capture) is logged once and runs
eagerly from then on. The least recently used captures are dropped beyond ``max_graphs``.

Weights are read by address: an in-place update (an optimizer step) is followed, a replaced
parameter (``model.to(dtype)``) makes a new signature and a new capture.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops import triton_scan

log = logging.getLogger(__name__)


def graph_unavailable_reason(device: torch.device | str) -> str | None:
    """None when a CUDA graph can be captured on ``device`` with the model's kernels, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the model is on {device.type!r}, not CUDA"
    from .. import ops

    reason = ops.cuda_unavailable_reason()
    if reason is not None:
        return f"the CUDA kernels are unavailable ({reason})"
    return None


def uncached_autocast():
    """Inside an autocast region, the same autocast without its weight-cast cache: a cached cast
    made before the capture would not be recorded in the graph, and its memory is freed when the
    region ends (torch's CUDA graphs notes). The casts then replay with the graph, every call."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def sharded(model: torch.nn.Module) -> bool:
    """FSDP gathers the weights into new storage for each call: a graph would read stale memory."""
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


class CapturedCall:
    """``fn(*inputs) -> sequence of tensors`` captured in one CUDA graph for these input shapes."""

    def __init__(
        self,
        fn: Callable[..., Sequence[Tensor]],
        inputs: Sequence[Tensor],
        pool: Any,
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        """``generators``: the CUDA generators ``fn`` draws from besides the default one; each
        replay advances them as a call would, and the warm-ups and capture leave them as they were."""
        dev = inputs[0].device
        saved = [g.get_state() for g in generators]
        # normal tensors even when captured under torch.inference_mode (Lightning's validation):
        # an inference tensor cannot be written in place outside inference mode, so a graph
        # captured there could not be replayed from a plain no_grad call later
        with torch.inference_mode(False), torch.no_grad():
            self.inputs = [t.detach().clone() for t in inputs]  # static buffers, outside the graph's pool
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), uncached_autocast():
                for _ in range(2):
                    fn(*self.inputs)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            for g in generators:
                self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph, pool=pool), uncached_autocast():
                self.outputs = list(fn(*self.inputs))
        for g, state in zip(generators, saved):
            g.set_state(state)

    def replay(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The graph's own output buffers: valid until the next replay. An input that is its own
        static buffer (a graph that writes its next input in place) is not copied."""
        for buf, t in zip(self.inputs, inputs):
            if t is not buf:
                buf.copy_(t)
        self.graph.replay()
        return self.outputs

    def __call__(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        return [o.clone() for o in self.replay(inputs)]


class GraphCache:
    """A model's captured calls by (name, input signature), at most ``max_graphs``, one memory pool.

    A signature is captured the ``capture_after``-th time it is seen (2 by default; the calls before
    run eagerly): a capture costs about three eager calls, so shapes that come once (an evaluation's
    last, smaller batch; a varying number of images per batch) are never captured, and a stream of
    always-new shapes cannot thrash the cache.
    """

    def __init__(self, model: torch.nn.Module, max_graphs: int = 8, capture_after: int = 2) -> None:
        self.model = weakref.ref(model)
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.calls: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # sightings of signatures not captured yet
        self.failed: set[str] = set()
        self.pool: Any = None
        self.captures = 0  # how many graphs were captured (tests read it)

    def signature(self, name: str, inputs: Sequence[Tensor]) -> tuple:
        model = self.model()
        weights = tuple(p.data_ptr() for p in model.parameters()) if model is not None else ()
        amp = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        # a graph holds the scan kernels chosen at capture
        kernels = (triton_scan.short_scan_switch(), triton_scan.state_scan_switch())
        return (
            name,
            amp,
            kernels,
            hash(weights),
            tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs),
        )

    def run(
        self, name: str, fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor]
    ) -> list[Tensor] | None:
        """The outputs of ``fn(*inputs)`` (clones) through a graph, or None when the caller should
        run ``fn`` eagerly: ``name`` cannot be captured (logged once), or this signature has been
        seen fewer than ``capture_after`` times."""
        if name in self.failed:
            return None
        key = self.signature(name, inputs)
        call = self.calls.get(key)
        if call is None:
            n = self.seen.pop(key, 0) + 1
            if n < self.capture_after:
                self.seen[key] = n
                while len(self.seen) > 16 * self.max_graphs:
                    self.seen.popitem(last=False)
                return None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            try:
                call = CapturedCall(fn, inputs, self.pool)
            except Exception as err:  # capture refused by an op: eager from now on, say why
                self.failed.add(name)
                log.warning(
                    "%s runs without a CUDA graph (capture failed: %s: %s)", name, type(err).__name__, err
                )
                torch.cuda.synchronize()
                return None
            self.captures += 1
            self.calls[key] = call
            while len(self.calls) > self.max_graphs:
                self.calls.popitem(last=False)
        self.calls.move_to_end(key)
        return call(inputs)


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_cache(model: torch.nn.Module) -> GraphCache:
    """The model's :class:`GraphCache` (created on first use, dropped with the model)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = GraphCache(model)
    return cache


def prompt_bucket(length: int) -> int:
    """The padded length a prompt of ``length`` tokens is captured at: 16, 32, ..., 512, then
    multiples of 512, so a handful of graphs serve every prompt (the pads are identity steps)."""
    if length <= 16:
        return 16
    if length <= 512:
        return 1 << (length - 1).bit_length()
    return -(-length // 512) * 512
