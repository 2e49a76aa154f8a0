"""The beam search loop that ``vlm_mamba.generation._beam_search`` replaced (per-row Python, one
``.tolist()`` per step), kept as the reference its vectorised form must equal row for row."""

from __future__ import annotations

import torch


def beam_search_loop(step_fn, state, logits, cfg):
    b, V = logits.shape
    k = cfg.num_beams
    dev = logits.device
    eos = cfg.eos_token_id
    state = state.repeat_interleave(k)
    logp = logits.float().log_softmax(-1).repeat_interleave(k, dim=0)
    beam_scores = torch.zeros(b, k, device=dev)
    beam_scores[:, 1:] = float("-inf")
    seqs = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    hyps: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(cfg.max_new_tokens):
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * V)
        top_s, top_i = cand.topk(2 * k, dim=1)
        top_beam, top_tok = top_i // V, top_i % V
        next_s = torch.zeros(b, k, device=dev)
        next_t = torch.full((b, k), cfg.pad_token_id, dtype=torch.long, device=dev)
        next_b = torch.zeros(b, k, dtype=torch.long, device=dev)
        top_s_l, top_beam_l, top_tok_l = top_s.tolist(), top_beam.tolist(), top_tok.tolist()
        for i in range(b):
            if done[i]:
                continue
            n_kept = 0
            for rank, (s, bi, t) in enumerate(zip(top_s_l[i], top_beam_l[i], top_tok_l[i])):
                if eos is not None and t == eos:
                    if rank < k:
                        seq = torch.cat([seqs[i * k + bi], seqs.new_tensor([eos])])
                        hyps[i].append((s / (step + 1) ** cfg.length_penalty, seq))
                    continue
                next_s[i, n_kept], next_t[i, n_kept], next_b[i, n_kept] = s, t, bi
                n_kept += 1
                if n_kept == k:
                    break
            if len(hyps[i]) >= k:
                done[i] = True
        if all(done):
            break
        flat = (torch.arange(b, device=dev)[:, None] * k + next_b).view(-1)
        seqs = torch.cat([seqs[flat], next_t.view(-1, 1)], dim=1)
        beam_scores = next_s
        if step == cfg.max_new_tokens - 1:
            break
        state = state.index_select(flat)
        logits, state = step_fn(next_t.view(-1), state)
        logp = logits.float().log_softmax(-1)
    for i in range(b):
        if not done[i]:
            n = seqs.shape[1]
            for j in range(k):
                s = float(beam_scores[i, j])
                if s > float("-inf"):
                    hyps[i].append((s / max(n, 1) ** cfg.length_penalty, seqs[i * k + j]))
    best = [max(h, key=lambda x: x[0])[1] for h in hyps]
    n = max(len(t) for t in best)
    out = torch.full((b, n), cfg.pad_token_id, dtype=torch.long, device=dev)
    for i, t in enumerate(best):
        out[i, : len(t)] = t
    return out
