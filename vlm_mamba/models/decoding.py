"""Decoding with a state updated in place, replayable as one CUDA graph per batch size.

The functional ``LanguageMamba.step(tokens, state) -> (logits, new_state)`` allocates a new state
every token and launches every op from Python: at batch 1 decoding is launch-bound (the issue
measured 63 tok/s against stock ``generate(cg=True)``'s 948). Here, as in mamba_ssm's
``utils/generation.py`` (``InferenceParams`` + ``update_graph_cache``):

- :class:`DecodeCache` holds the decoding state in buffers it owns, outside the modules (a clone of
  the prefill's state), and the layers' ``A = -exp(A_log)`` computed once. ``LanguageMamba.step_``
  updates it in place through the kernels' own in-place updates (``causal_conv1d_update``,
  ``selective_state_update``). Beam search reorders it with one device gather per buffer
  (:meth:`DecodeCache.index_select`, in place).
- :class:`GraphedStep` captures ``step_`` for one cache (its batch size) in a CUDA graph after a
  warm-up on a side stream (which also runs triton's autotuning outside the capture); a step is
  then one copy of the tokens in and one graph replay.
- :func:`step_fn` gives ``vlm_mamba.generation.decode`` a step function over either: the graph on
  CUDA when ``cuda_graph`` is on, else the in-place eager step. The functional ``step`` stays the
  reference (tests compare logits per element) and the CPU default.

Weights should be in the compute dtype (``model.to(torch.bfloat16)``) when decoding under a graph:
in an autocast region the graph is captured with autocast's cast cache off (a cached cast would be
freed behind the graph's back), so every weight is re-cast at every token. Sharded (FSDP) models
decode in place without a graph: their gathered weights move between calls.

Shapes: ``b`` rows, ``V`` vocabulary.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..generation import TokenSelector
from ..layers.state import InferenceState, MixerState
from .graphs import CapturedCall, graph_unavailable_reason, sharded

log = logging.getLogger(__name__)


class DecodeCache:
    """Decoding state in buffers updated in place: one ``MixerState`` per layer, plus each layer's A.

    Duck-types the parts of ``InferenceState`` that ``vlm_mamba.generation`` uses: ``batch_size``,
    ``index_select`` (in place here: beams reordered by a device gather, the same buffers kept, so a
    captured graph stays valid) and ``repeat_interleave`` (a new, larger cache).
    """

    def __init__(self, lm: Any, state: InferenceState) -> None:
        self.lm = lm
        # normal tensors even when made under torch.inference_mode (Lightning's validation): the
        # cache is reused by later calls, and an inference tensor cannot be updated in place
        # outside inference mode
        with torch.inference_mode(False), torch.no_grad():
            self.state = InferenceState([MixerState(s.conv.clone(), s.ssm.clone()) for s in state])
            self.A = [layer.mixer.decode_A() for layer in lm.layers]
        self.graph: GraphedStep | None = None
        self.graph_failed = False
        # step + token selection, one graph per selection (TokenSelector.key), drawing samples
        # from this cache's generator (a graph reads the generator it was captured with)
        self.select_graphs: dict[tuple, CapturedCall] = {}
        self.select_failed = False
        self.generator: torch.Generator | None = None

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @torch.no_grad()
    def load_(self, state: InferenceState) -> DecodeCache:
        """Copy ``state`` (same shapes) into the buffers, and A from the current weights (a captured
        graph reads both by address: they are refreshed in place)."""
        for mine, theirs in zip(self.state, state):
            mine.conv.copy_(theirs.conv)
            mine.ssm.copy_(theirs.ssm)
        for a, layer in zip(self.A, self.lm.layers):
            _distinct(a).copy_(_distinct(layer.mixer.decode_A()))
        return self

    def matches(self, state: InferenceState) -> bool:
        """Whether ``state`` fits these buffers (same rows, shapes, dtypes, device)."""
        return len(state) == len(self.state) and all(
            a.conv.shape == b.conv.shape and a.ssm.shape == b.ssm.shape and a.conv.dtype == b.conv.dtype
            and a.ssm.device == b.ssm.device
            for a, b in zip(self.state, state)
        )  # fmt: skip

    @torch.no_grad()
    def index_select(self, idx: Tensor) -> DecodeCache:
        """Rows ``idx`` (b,) of the current state, written back into the same buffers (beam reorder)."""
        idx = idx.to(self.state[0].ssm.device)
        for s in self.state:
            s.conv.copy_(s.conv.index_select(0, idx))
            s.ssm.copy_(s.ssm.index_select(0, idx))
        return self

    def repeat_interleave(self, n: int) -> DecodeCache:
        """The model's cache of ``b * n`` rows, each row ``n`` times (beam search's start)."""
        return cache_for(self.lm, self.state.repeat_interleave(n))

    def snapshot(self) -> InferenceState:
        return self.state.clone()

    def step(self, tokens: Tensor, cuda_graph: bool = False) -> Tensor:
        """One token per row (b,) -> logits (b,V), the buffers updated in place. A graph that cannot
        be captured is logged once and this cache steps eagerly in place instead."""
        if cuda_graph and self.graph is None and not self.graph_failed:
            try:
                self.graph = GraphedStep(self.lm, self)
            except Exception as err:  # capture refused by an op: decode eagerly, say why
                self.graph_failed = True
                log.warning("decoding without a CUDA graph (capture failed: %s: %s)", type(err).__name__, err)
        if self.graph is not None:
            return self.graph(tokens)
        return self.lm.step_(tokens, self)

    def step_select(
        self, tokens: Tensor, done: Tensor, selector: TokenSelector, cuda_graph: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step on ``tokens`` (b,), then choose the next tokens from the new logits with
        ``selector`` (greedy or a sample; padding after EOS, ``done`` (b,) updated): returns
        (next tokens, done, logits). With ``cuda_graph`` both are one replay of a graph captured per
        selection; what it returns are the graph's buffers, valid until the next call, and handed
        back to it as they are (no copy in). A capture that fails is logged once, then eager."""
        if selector.generator is not None:
            if self.generator is None:
                self.generator = torch.Generator(device=self.state[0].ssm.device)
            selector.adopt(self.generator)
        if cuda_graph and not self.select_failed:
            call = self.select_graphs.get(selector.key)
            if call is None:
                try:
                    call = self.select_graphs[selector.key] = self._capture_select(selector, tokens, done)
                except Exception as err:  # capture refused by an op: select eagerly, say why
                    self.select_failed = True
                    log.warning(
                        "token selection runs outside the decode graph (capture failed: %s: %s)",
                        type(err).__name__,
                        err,
                    )
            if call is not None:
                tok, done, logits = call.replay([tokens, done])
                return tok, done, logits
        logits = self.lm.step_(tokens, self)
        return selector(logits, done), done, logits

    def _capture_select(self, selector: TokenSelector, tokens: Tensor, done: Tensor) -> CapturedCall:
        dev = self.state[0].ssm.device
        if dev.type != "cuda":
            raise RuntimeError(f"CUDA graphs need CUDA tensors, the decoding state is on {dev}")
        if sharded(self.lm):
            raise RuntimeError("the model's parameters are sharded (FSDP)")

        def step_and_select(t: Tensor, d: Tensor) -> list[Tensor]:
            logits = self.lm.step_(t, self)
            t.copy_(selector(logits, d))  # the next step's input, in place (d is updated in place)
            return [t, d, logits]

        saved = self.snapshot()
        gens = [self.generator] if selector.generator is not None else []
        call = CapturedCall(step_and_select, [tokens, done], pool=None, generators=gens)
        self.load_(saved)
        return call


class GraphedStep:
    """``lm.step_(tokens, cache)`` captured in a CUDA graph for ``cache``'s buffers and batch size
    (``graphs.CapturedCall``: two warm-ups on a side stream for cuBLAS workspaces and triton's
    autotuning, then the capture), with the cache's content saved and restored around it, so
    capturing never changes the state being decoded. A step returns the graph's logits buffer.
    """

    def __init__(self, lm: Any, cache: DecodeCache) -> None:
        dev = cache.state[0].ssm.device
        if dev.type != "cuda":
            raise RuntimeError(f"CUDA graphs need CUDA tensors, the decoding state is on {dev}")
        if sharded(lm):  # FSDP gathers the weights into new storage for each call
            raise RuntimeError("the model's parameters are sharded (FSDP)")
        with torch.inference_mode(False):
            tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=dev)
        saved = cache.snapshot()
        self.call = CapturedCall(lambda t: [lm.step_(t, cache)], [tokens], pool=None)
        cache.load_(saved)

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.call.replay([tokens])[0]


def _distinct(t: Tensor) -> Tensor:
    """``t`` without its broadcast dimensions (stride 0: Mamba-2's A is its (h,) values expanded to
    (h,p,n)), a view of the same memory that can be written. Not ``t._base``: a view made under
    torch.inference_mode records no base."""
    return t[tuple(0 if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))]


# One cache (and so one captured graph) per model and batch shape, reused by later generate calls,
# as mamba_ssm's update_graph_cache does. Weakly keyed: a model that is dropped frees its graphs.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_for(lm: Any, state: InferenceState) -> DecodeCache:
    """The model's cache for ``state``'s shapes, loaded with ``state`` (created on first use)."""
    per_model = _CACHES.setdefault(lm, {})
    # the fused-step switch is part of the key: a graph captured with one set of kernels is not
    # replayed after the switch changes
    key = (ops.fused_step_switch(), ops.fused_conv_switch(), ops.fused_xproj_switch()) + tuple(
        (s.conv.shape, s.ssm.shape, s.conv.dtype, str(s.ssm.device)) for s in state
    )
    cache = per_model.get(key)
    if cache is None:
        cache = per_model[key] = DecodeCache(lm, state)
        return cache
    return cache.load_(state)


def step_fn(lm: Any, cuda_graph: bool = False):
    """A ``step_fn(tokens, state) -> (logits, state)`` for ``vlm_mamba.generation.decode`` that
    decodes in place: the first call loads the prefill's ``InferenceState`` into the model's
    :class:`DecodeCache` for that shape (beam search hands over its repeated state the same way),
    and with ``cuda_graph`` every step replays that cache's captured graph. The logits are the
    graph's output buffer: read them before the next step (``decode`` does). One generation at a
    time per model and batch shape (the buffers are shared across calls)."""

    def fn(tokens: Tensor, state: Any):
        cache = state if isinstance(state, DecodeCache) else cache_for(lm, state)
        return cache.step(tokens, cuda_graph=cuda_graph), cache

    def select_step(tokens: Tensor, done: Tensor, state: Any, selector: TokenSelector):
        cache = state if isinstance(state, DecodeCache) else cache_for(lm, state)
        tok, done, logits = cache.step_select(tokens, done, selector, cuda_graph=cuda_graph)
        return tok, done, logits, cache

    fn.select_step = select_step  # decode's step + selection in one call (one graph replay)
    return fn


def make_step_fn(lm: Any, decoder: str, device: torch.device | str):
    """The step function ``decode`` uses for ``lm`` and a ``GenerationConfig.decoder`` choice:
    "auto" is "graph" on CUDA with the kernels, else "functional"; "graph" where no graph can be
    captured falls back to "inplace", logged once per reason."""
    if decoder == "auto":
        decoder = "graph" if graph_unavailable_reason(device) is None else "functional"
    elif decoder == "graph":
        reason = graph_unavailable_reason(device)
        if reason is not None:
            if reason not in _LOGGED:
                _LOGGED.add(reason)
                log.info("decoder='graph' runs in place without a CUDA graph: %s", reason)
            decoder = "inplace"
    if decoder == "functional":

        def functional(tokens: Tensor, state: Any):
            out = lm.step(input_ids=tokens, state=state)
            return out.logits, out.state

        return functional
    return step_fn(lm, cuda_graph=decoder == "graph")


_LOGGED: set[str] = set()
