"""Recurrent decoding: greedy, beam search and sampling over a Mamba state.

Glossary: ``b`` rows (prompts), ``k`` beams, ``V`` vocabulary, ``n`` new tokens.

A Mamba language model decodes with a fixed-size state per row (conv window + SSM state), so
memory per generated token is constant and a beam step is a gather of that state
(``InferenceState.index_select``), as in mamba_ssm's ``utils/generation.py``. The decoders here
only see a ``step_fn(tokens (b,), state) -> (logits (b, V), state)`` and the logits of the last
prompt position; the model decides how prompts and images are prefilled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
DECODERS = ("auto", "functional", "inplace", "graph")


@dataclass
class GenerationConfig:
    """Decoding options. ``num_beams > 1`` is beam search; ``do_sample`` samples; else greedy."""

    max_new_tokens: int = 20
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    length_penalty: float = 1.0
    seed: int | None = None
    # how the model steps (vlm_mamba.models.decoding): "functional" (step(tokens, state) -> new
    # state: the reference), "inplace" (a DecodeCache updated in place), "graph" (that step replayed
    # as one CUDA graph per batch shape), "auto" (graph on CUDA with the kernels, else functional)
    decoder: str = "auto"
    sync_every: int = 8  # greedy/sampling: the loop reads "all rows done?" back every this many tokens
    # VLMamba.generate: the image prefill (one graph per image batch shape) and the prompt prefill
    # from the image state (prompts left-padded to a bucket of lengths, one graph per bucket)
    # replayed as CUDA graphs (vlm_mamba.models.graphs). None (default): wherever a graph can be
    # captured (CUDA kernels, encoder mode, eval mode, not sharded), op by op elsewhere; True: the
    # same, and the reason is logged where it cannot; False: always op by op
    prefill_graph: bool | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: expected one of {DECODERS}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, descending: bool = False
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering (Holtzman et al. 2020); (b, V) -> (b, V).
    ``descending``: each row is already sorted best first (no sort for top-p)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        if descending:
            sorted_logits, order = logits, None
        else:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if order is None:
            return sorted_logits
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class TokenSelector:
    """Each row's next token from its logits (b, V): greedy argmax, or a sample after temperature,
    top-k and top-p; padding after a row's EOS, and ``done`` (b,) updated in place.

    A sample is drawn by the exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per
    entry: ``E_i / p_i`` is exponential with rate ``p_i``, so the smallest is ``i`` with probability
    ``p_i``, an exact draw from ``p`` (as vLLM's sampler draws). Unlike ``torch.multinomial`` it is
    fixed-shape tensor work with no host read, so the decode step's CUDA graph can hold it
    (``vlm_mamba.models.decoding``). The noise comes from this selector's own generator, seeded by
    ``seed`` (or, when it is None, from torch's default CPU generator: ``torch.manual_seed`` makes
    it repeatable), the same draws whichever decoder steps the model.
    """

    def __init__(self, cfg: GenerationConfig, device: torch.device | str) -> None:
        self.cfg = cfg
        self.generator: torch.Generator | None = None
        if cfg.do_sample:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def key(self) -> tuple:
        """What the selection computes: a graph captured with one key is replayed only for it."""
        c = self.cfg
        return (c.do_sample, c.temperature, c.top_k, c.top_p, c.eos_token_id, c.pad_token_id)

    def adopt(self, generator: torch.Generator) -> None:
        """Draw from ``generator`` from now on, continuing this selector's stream (its state is
        copied over): a captured graph reads the generator it was captured with."""
        if self.generator is not None and generator is not self.generator:
            generator.set_state(self.generator.get_state())
            self.generator = generator

    def __call__(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.do_sample and 0 < c.top_k < logits.shape[-1]:
            # the k best first (sorted), then temperature and top-p among them only: the same
            # distribution as filtering the whole row, without sorting the vocabulary
            vals, idx = logits.float().topk(c.top_k, dim=-1)  # (b, k), descending
            probs = filter_logits(vals, c.temperature, 0, c.top_p, descending=True).softmax(-1)
            race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(1e-30)
            tok = idx.gather(-1, (probs / race).argmax(-1, keepdim=True)).squeeze(-1)  # (b,)
        elif c.do_sample:
            probs = filter_logits(logits, c.temperature, c.top_k, c.top_p).softmax(-1)
            race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(1e-30)
            tok = (probs / race).argmax(-1)  # (b,)
        else:
            tok = logits.argmax(-1)  # (b,)
        tok = tok.masked_fill(done, c.pad_token_id)
        if c.eos_token_id is not None:
            done |= tok == c.eos_token_id
        return tok


@torch.no_grad()
def decode(step_fn: StepFn, state: Any, logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Generate from ``logits`` (b, V) of the last prompt position and the state after it.

    Returns (b, n) token ids; each row stops at its EOS (kept), then ``pad_token_id``. A step
    function with a ``select_step(tokens, done, state, selector) -> (tokens, done, logits, state)``
    attribute (the in-place decoders of ``vlm_mamba.models.decoding``) steps and chooses the next
    tokens in one call: under a CUDA graph, the model's step and the sampler are one replay.
    """
    if cfg.num_beams > 1:
        return _beam_search(step_fn, state, logits, cfg)
    select = TokenSelector(cfg, logits.device)
    fused = getattr(step_fn, "select_step", None)
    b = logits.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    out = torch.full((b, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=logits.device)
    tok = select(logits, done)
    out[:, 0] = tok
    n = cfg.max_new_tokens  # columns to return: up to the step where the last row finished
    for i in range(1, cfg.max_new_tokens):
        # the exit test reads the device: only every sync_every tokens (a finished row's extra
        # steps emit padding, cut below), so the loop otherwise only launches work
        if i % cfg.sync_every == 0 and bool(done.all()):
            n = i
            break
        if fused is not None:
            tok, done, _, state = fused(tok, done, state, select)
        else:
            logits, state = step_fn(tok, state)
            tok = select(logits, done)
        out[:, i] = tok
    return _trim(out[:, :n], done, cfg)


def _trim(out: torch.Tensor, done: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Drop trailing columns after the step at which every row had emitted its EOS (one host read)."""
    if cfg.eos_token_id is None or not bool(done.all()):
        return out
    is_eos = out == cfg.eos_token_id  # (b, n)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), out.shape[1] - 1)  # (b,)
    return out[:, : int(first.max()) + 1]


def _beam_search(step_fn: StepFn, state: Any, logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Beam search with early stopping: a row is done once it holds ``num_beams`` finished hypotheses.

    Finished hypotheses are ranked by ``sum log p / length ** length_penalty``. With one beam this
    is exactly greedy decoding (the best candidate is always taken; an EOS ends the row).

    Everything stays on the device: per step one top-2k over (b, k*V), the finished hypotheses
    written into (b, 2k) slots by a scatter, the beams reordered by one gather of the sequences and
    one of the state (``state.index_select``, in place for a ``DecodeCache``); no per-row Python
    loop and no host read per step but the "all rows done?" exit test every ``sync_every`` steps.
    The result equals the reference loop's (``tests/test_generation.py``) for every row.
    """
    b, V = logits.shape
    k, n_max = cfg.num_beams, cfg.max_new_tokens
    dev = logits.device
    eos, pad, lp = cfg.eos_token_id, cfg.pad_token_id, cfg.length_penalty
    neg_inf = float("-inf")
    state = state.repeat_interleave(k)  # (b*k, ...)
    logp = logits.float().log_softmax(-1).repeat_interleave(k, dim=0)  # (b*k, V)
    beam_scores = torch.zeros(b, k, device=dev)
    beam_scores[:, 1:] = neg_inf  # all beams start equal: keep one so candidates are distinct
    seqs = torch.full((b, k, n_max), pad, dtype=torch.long, device=dev)  # live beams, pad after step
    # finished hypotheses: at most k - 1 before a row is done, plus at most k in the step that ends
    # it (the EOS of each beam) -> 2k slots, and one more as the write target of non-additions
    slots = 2 * k
    hyp_s = torch.full((b, slots + 1), neg_inf, device=dev)
    hyp_seq = torch.full((b, slots + 1, n_max), pad, dtype=torch.long, device=dev)
    hyp_len = torch.zeros(b, slots + 1, dtype=torch.long, device=dev)
    n_hyp = torch.zeros(b, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * k, device=dev)
    rows = torch.arange(b, device=dev)
    n = 0  # columns of seqs filled
    for step in range(n_max):
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * V)  # (b, k*V)
        top_s, top_i = cand.topk(2 * k, dim=1)  # (b, 2k), best first
        top_beam, top_tok = top_i // V, top_i % V
        is_eos = top_tok == eos if eos is not None else torch.zeros_like(top_tok, dtype=torch.bool)
        # an EOS among the k best candidates of a live row is a finished hypothesis
        add = is_eos & (rank < k) & ~done[:, None]  # (b, 2k)
        slot = torch.where(add, n_hyp[:, None] + add.cumsum(1) - 1, slots)  # non-additions -> the spare
        parent = seqs.gather(1, top_beam[..., None].expand(-1, -1, n_max))  # (b, 2k, n_max)
        parent[:, :, step] = eos if eos is not None else pad
        hyp_s.scatter_(1, slot, torch.where(add, top_s / (step + 1) ** lp, neg_inf))
        hyp_len.scatter_(1, slot, torch.full_like(slot, step + 1))
        hyp_seq.scatter_(1, slot[..., None].expand(-1, -1, n_max), parent)
        n_hyp += add.sum(1)
        # the next beams: the k best candidates that are not EOS (at most k of the 2k are EOS: one per
        # beam), in rank order; a row done before this step carries zeros and padding
        keep = ~is_eos
        keep &= keep.cumsum(1) <= k
        pos = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]  # (b, k)
        was_done = done[:, None]
        next_s = torch.where(was_done, 0.0, top_s.gather(1, pos))
        next_t = torch.where(was_done, pad, top_tok.gather(1, pos))
        next_b = torch.where(was_done, 0, top_beam.gather(1, pos))
        done = done | (n_hyp >= k)
        seqs = seqs.gather(1, next_b[..., None].expand(-1, -1, n_max))
        seqs[:, :, step] = next_t
        beam_scores = next_s
        n = step + 1
        if step == n_max - 1 or ((step + 1) % cfg.sync_every == 0 and bool(done.all())):
            break  # extra steps after every row is done change no hypothesis
        flat = (rows[:, None] * k + next_b).view(-1)  # (b*k,) parent beams
        state = state.index_select(flat)
        logits, state = step_fn(next_t.view(-1), state)
        logp = logits.float().log_softmax(-1)
    # rows still live: their beams with a finite score join the hypotheses, in beam order
    live = ~done[:, None] & (beam_scores > neg_inf)  # (b, k)
    slot = torch.where(live, n_hyp[:, None] + live.cumsum(1) - 1, slots)
    hyp_s.scatter_(1, slot, torch.where(live, beam_scores / max(n, 1) ** lp, neg_inf))
    hyp_len.scatter_(1, slot, torch.full_like(slot, n))
    hyp_seq.scatter_(1, slot[..., None].expand(-1, -1, n_max), seqs)
    best = hyp_s[:, :slots].argmax(1)  # the first of equal scores, as the loop's max() takes
    out = hyp_seq[rows, best]  # (b, n_max), padding after each hypothesis
    return out[:, : int(hyp_len[rows, best].max())]
