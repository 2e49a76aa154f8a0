"""Generation: batched == one by one, cache == recompute, image-state cache, beams, sampling."""

import pytest
import torch

from vlm_mamba import create_model
from vlm_mamba.generation import GenerationConfig, filter_logits

EOS = 3
PAD = 0


def _model(**kw):
    torch.manual_seed(0)
    return create_model("tiny", eos_token_id=EOS, pad_token_id=PAD, **kw).eval()


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, prompts))
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return ids, mask


def _strip(row: torch.Tensor) -> list[int]:
    out = []
    for t in row.tolist():
        out.append(t)
        if t == EOS:
            break
    return out


PROMPTS = [[1, 17, 42], [1, 9], [1, 5, 6, 7, 8, 11], [1]]


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_by_one(ssm, num_beams):
    model = _model(language={"ssm": ssm})
    images = torch.randn(len(PROMPTS), 3, 32, 32)
    ids, mask = _left_pad(PROMPTS)
    batched = model.generate(images, ids, mask, max_new_tokens=8, num_beams=num_beams)
    for i, p in enumerate(PROMPTS):
        alone = model.generate(images[i : i + 1], torch.tensor([p]), max_new_tokens=8, num_beams=num_beams)
        assert _strip(batched[i]) == _strip(alone[0]), f"row {i}"


def test_cached_state_generation_equals_recomputation():
    """Greedy decoding through the recurrent state equals re-running the full sequence each step."""
    model = _model()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _left_pad(PROMPTS[:2])
    out = model.generate(images, ids, mask, max_new_tokens=6)
    for i, p in enumerate(PROMPTS[:2]):
        seq = list(p)
        for _ in range(6):
            logits = model(images[i : i + 1], torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
            if seq[-1] == EOS:
                break
        assert _strip(out[i]) == seq[len(p) :]


@pytest.mark.parametrize("vision_mode", ["encoder", "fuyu"])
def test_image_state_cache_equals_no_cache_with_forked_questions(vision_mode):
    """Five questions of different lengths forked from two cached images == full recomputation."""
    model = _model(vision_mode=vision_mode)
    images = torch.randn(2, 3, 32, 32)
    prompts = [[1, 4, 5], [1, 6, 7, 8, 9, 10], [1, 11], [1, 12, 13, 14], [1]]
    image_index = torch.tensor([0, 0, 0, 1, 1])
    ids, mask = _left_pad(prompts)
    cached = model.generate(images, ids, mask, image_index=image_index, max_new_tokens=6)
    fresh = model.generate(
        images, ids, mask, image_index=image_index, max_new_tokens=6, use_image_cache=False
    )
    assert torch.equal(cached, fresh)
    state = model.prefill_images(images)
    reused = model.generate(None, ids, mask, image_index=image_index, image_state=state, max_new_tokens=6)
    assert torch.equal(reused, cached)
    for i, p in enumerate(prompts):
        alone = model.generate(
            images[image_index[i] : image_index[i] + 1], torch.tensor([p]), max_new_tokens=6
        )
        assert _strip(cached[i]) == _strip(alone[0])


def test_beam_width_one_equals_greedy():
    model = _model()
    images = torch.randn(3, 3, 32, 32)
    ids, mask = _left_pad(PROMPTS[:3])
    greedy = model.generate(images, ids, mask, max_new_tokens=10)
    beam1 = model.generate(images, ids, mask, max_new_tokens=10, num_beams=1)
    assert torch.equal(greedy, beam1)
    from vlm_mamba.generation import _beam_search

    def step_fn(tok, st):
        o = model.language.step(input_ids=tok, state=st)
        return o.logits, o.state

    txt = model.language.embed(ids)
    st = model.prefill_images(images)
    o = model.language(inputs_embeds=txt, attention_mask=mask.bool(), state=st, return_state=True)
    b1 = _beam_search(
        step_fn, o.state, o.logits[:, -1], GenerationConfig(max_new_tokens=10, num_beams=1, eos_token_id=EOS)
    )
    assert [_strip(r) for r in b1] == [_strip(r) for r in greedy]


class _MarkovState:
    def __init__(self, last):
        self.last = last

    def index_select(self, idx):
        return _MarkovState(self.last[idx])

    def repeat_interleave(self, n):
        return _MarkovState(self.last.repeat_interleave(n))


def test_wide_beam_search_equals_exhaustive_search():
    """On a random Markov chain, a beam as wide as the search space finds the most likely sequence,
    which greedy decoding generally does not."""
    from itertools import product

    from vlm_mamba.generation import decode

    g = torch.Generator().manual_seed(3)
    V, n = 4, 4
    T = torch.randn(V, V, V, generator=g) * 2  # logits of the next token given the last two
    first = torch.randn(4, V, generator=g) * 2  # (b, V) logits after each prompt

    def step(tok, st):  # the state carries the token before ``tok``: beams must reorder it
        return T[st.last, tok], _MarkovState(tok)

    def score(row, seq):
        lp, logits, prev = 0.0, first[row], 0
        for t in seq:
            lp += float(logits.log_softmax(-1)[t])
            logits, prev = T[prev, t], t
        return lp

    cfg = GenerationConfig(max_new_tokens=n, num_beams=V ** (n - 1), eos_token_id=None, length_penalty=0.0)
    out = decode(step, _MarkovState(torch.zeros(4, dtype=torch.long)), first, cfg)
    for row in range(4):
        best = max(product(range(V), repeat=n), key=lambda s: score(row, s))
        assert tuple(out[row].tolist()) == best


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("eos", [None, 1])
def test_vectorised_beam_search_equals_the_loop(num_beams, length_penalty, eos):
    """The device-side beam search returns exactly the per-row loop's sequences, on random Markov
    chains where EOS is likely (rows finish at different steps, several hypotheses per step, rows
    that never finish), whatever sync_every is."""
    from tests._beam_reference import beam_search_loop
    from vlm_mamba.generation import _beam_search

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        V, b = 6, 5
        T = torch.randn(V, V, V, generator=g) * 2.5
        if eos is not None:
            T[..., eos] += 1.5  # EOS common, not certain
        first = torch.randn(b, V, generator=g) * 2

        def step(tok, st, T=T):
            return T[st.last, tok], _MarkovState(tok)

        for sync_every, n in ((1, 7), (3, 7), (8, 5)):
            cfg = GenerationConfig(max_new_tokens=n, num_beams=num_beams, eos_token_id=eos, pad_token_id=0,
                                   length_penalty=length_penalty, sync_every=sync_every)  # fmt: skip
            start = _MarkovState(torch.zeros(b, dtype=torch.long))
            ref = beam_search_loop(step, start, first, cfg)
            out = _beam_search(step, start, first, cfg)
            assert out.shape == ref.shape, (seed, sync_every, out.shape, ref.shape)
            assert torch.equal(out, ref), (seed, sync_every, out, ref)


def test_beam_search_reads_the_host_only_at_the_exit_test(monkeypatch):
    """No per-step .tolist()/.item(): over 12 steps with sync_every=4 the loop converts device
    values to Python 3 times (the exit test) plus once for the result's length."""
    from vlm_mamba.generation import _beam_search

    calls = {"bool": 0, "int": 0, "tolist": 0, "item": 0}
    real_bool, real_int = torch.Tensor.__bool__, torch.Tensor.__int__
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def counting(name, fn):
        def wrapper(self, *a, **kw):
            calls[name] += 1
            return fn(self, *a, **kw)

        return wrapper

    g = torch.Generator().manual_seed(0)
    T = torch.randn(5, 5, 5, generator=g)
    first = torch.randn(3, 5, generator=g)

    def step(tok, st):
        return T[st.last, tok], _MarkovState(tok)

    cfg = GenerationConfig(max_new_tokens=12, num_beams=3, eos_token_id=None, sync_every=4)
    monkeypatch.setattr(torch.Tensor, "__bool__", counting("bool", real_bool))
    monkeypatch.setattr(torch.Tensor, "__int__", counting("int", real_int))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counting("item", real_item))
    out = _beam_search(step, _MarkovState(torch.zeros(3, dtype=torch.long)), first, cfg)
    monkeypatch.undo()
    assert out.shape == (3, 12)
    assert calls["tolist"] == 0 and calls["item"] == 0
    assert calls["bool"] == 2 and calls["int"] == 1, calls  # steps 4 and 8 (12 is the last), the length


def test_sampling_is_seeded_and_filters():
    model = _model()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _left_pad(PROMPTS[:2])
    a = model.generate(
        images, ids, mask, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=7, max_new_tokens=6
    )
    b = model.generate(
        images, ids, mask, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=7, max_new_tokens=6
    )
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, :3]).all()
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.7)[0])
    probs = logits.softmax(-1)[0]
    assert kept.tolist() == [False, False, False, True, True] and probs[3:].sum() >= 0.7
    # top_k=1 sampling is greedy
    g = model.generate(images, ids, mask, max_new_tokens=6)
    s = model.generate(images, ids, mask, do_sample=True, top_k=1, seed=1, max_new_tokens=6)
    assert torch.equal(g, s)


class _CountdownState:
    """A fake recurrent state: row i emits EOS after ``stop[i]`` tokens (token = 10 + step)."""

    def __init__(self, step, stop):
        self.step, self.stop = step, stop

    def index_select(self, idx):
        return _CountdownState(self.step[idx], self.stop[idx])

    def repeat_interleave(self, n):
        return _CountdownState(self.step.repeat_interleave(n), self.stop.repeat_interleave(n))


def _countdown_logits(st):
    logits = torch.full((len(st.step), 32), -10.0)
    tok = torch.where(st.step >= st.stop, torch.full_like(st.step, EOS), 10 + st.step)
    logits[torch.arange(len(tok)), tok] = 10.0
    return logits


def _countdown_step(tok, st):
    nxt = _CountdownState(st.step + 1, st.stop)
    return _countdown_logits(nxt), nxt


@pytest.mark.parametrize("num_beams", [1, 2])
def test_stops_per_row_at_eos_and_pads_after(num_beams):
    from vlm_mamba.generation import decode

    st = _CountdownState(torch.zeros(3, dtype=torch.long), torch.tensor([2, 5, 0]))
    cfg = GenerationConfig(max_new_tokens=8, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD)
    out = decode(_countdown_step, st, _countdown_logits(st), cfg).tolist()
    assert out[0][:3] == [10, 11, EOS] and set(out[0][3:]) <= {PAD}
    assert out[1][:6] == [10, 11, 12, 13, 14, EOS] and set(out[1][6:]) <= {PAD}
    assert out[2][0] == EOS and set(out[2][1:]) <= {PAD}
    # without an EOS id every row runs to max_new_tokens
    cfg = GenerationConfig(max_new_tokens=4, num_beams=num_beams, eos_token_id=None)
    st = _CountdownState(torch.zeros(2, dtype=torch.long), torch.tensor([9, 9]))
    assert decode(_countdown_step, st, _countdown_logits(st), cfg).shape == (2, 4)


def test_generation_config_rejects_bad_values():
    for bad in [
        {"max_new_tokens": 0},
        {"num_beams": 0},
        {"temperature": 0},
        {"top_p": 0},
        {"do_sample": True, "num_beams": 2},
    ]:
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def _perturbed(**kw):
    """The tiny model moved away from init: an untrained model's rows degenerate to repeated
    tokens with top-1/top-2 margins of 0.01-0.08, where comparing argmax tokens proves little."""
    model = _model(**kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _record_logits(monkeypatch) -> list[list[torch.Tensor]]:
    """Every generate call appends the logits of each decoding step: [prefill's last, step 1, ...]."""
    import vlm_mamba.models.vlm as vlm_module

    calls: list[list[torch.Tensor]] = []
    real = vlm_module.decode

    def spy(step_fn, state, logits, cfg):
        seen = [logits.clone()]
        calls.append(seen)

        def step(tok, st):
            out, st = step_fn(tok, st)
            seen.append(out.clone())
            return out, st

        return real(step, state, logits, cfg)

    monkeypatch.setattr(vlm_module, "decode", spy)
    return calls


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_logits_equal_one_by_one_per_element(monkeypatch, ssm, num_beams):
    """Left-padded prompts after the image-state cache: each row's logits at every step equal the
    row decoded alone, per element (beams: the row's k beams), and the tokens too."""
    model = _perturbed(language={"ssm": ssm})
    calls = _record_logits(monkeypatch)
    images = torch.randn(len(PROMPTS), 3, 32, 32)
    ids, mask = _left_pad(PROMPTS)
    kw = dict(max_new_tokens=6, num_beams=num_beams, eos_token_id=None)  # no early stop: all steps compare
    batched = model.generate(images, ids, mask, **kw)
    for i, p in enumerate(PROMPTS):
        alone = model.generate(images[i : i + 1], torch.tensor([p]), **kw)
        assert batched[i].tolist() == alone[0].tolist(), f"row {i}"
        for step, (lb, la) in enumerate(zip(calls[0], calls[-1])):
            rows = slice(i * num_beams, (i + 1) * num_beams) if step and num_beams > 1 else slice(i, i + 1)
            torch.testing.assert_close(lb[rows], la, atol=2e-5, rtol=1e-5, msg=f"row {i} step {step}")
        assert len(calls[-1]) == 6


def test_image_state_cache_logits_equal_recomputation_per_element(monkeypatch):
    model = _perturbed()
    calls = _record_logits(monkeypatch)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _left_pad([[1, 4, 5], [1, 6, 7, 8, 9, 10], [1]])
    index = torch.tensor([0, 1, 1])
    kw = dict(image_index=index, max_new_tokens=5, eos_token_id=None)
    model.generate(images, ids, mask, **kw)
    model.generate(images, ids, mask, use_image_cache=False, **kw)
    for a, b in zip(*calls):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_sampled_tokens_are_seeded_and_their_logits_equal_the_full_forward(monkeypatch):
    """Sampling (fixed seed): the same seed gives the same tokens, and the logits at each step equal
    a teacher-forced forward over [image][prompt][sampled tokens], per element."""
    model = _perturbed()
    calls = _record_logits(monkeypatch)
    images = torch.randn(2, 3, 32, 32)
    ids, mask = _left_pad(PROMPTS[:2])
    kw = dict(max_new_tokens=6, do_sample=True, top_k=50, seed=3, eos_token_id=None)
    out = model.generate(images, ids, mask, **kw)
    assert torch.equal(model.generate(images, ids, mask, **kw), out)
    for i, p in enumerate(PROMPTS[:2]):
        full = model(images[i : i + 1], torch.tensor([p + out[i].tolist()])).logits[0]  # (t, V)
        for step, logits in enumerate(calls[0]):
            torch.testing.assert_close(logits[i], full[len(p) - 1 + step], atol=2e-5, rtol=1e-5)


def test_sampler_draws_from_the_filtered_distribution():
    """The exponential race (argmax p / E) samples each token with its probability after
    temperature / top-k / top-p, and never one they removed: 40000 rows of the same logits against
    the expected counts (5 standard deviations), two seeds."""
    from vlm_mamba.generation import TokenSelector

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 1.5]]).expand(40000, -1)
    cases = (
        {"temperature": 0.7},
        {"top_k": 3},
        {"top_p": 0.8, "temperature": 1.3},
        {"top_k": 4, "top_p": 0.7},
    )
    for kw in cases:  # top_k < V: top-p and the draw among the k best only
        cfg = GenerationConfig(do_sample=True, seed=11, **kw)
        probs = filter_logits(logits[:1], cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)[0]
        for seed in (11, 12):
            cfg.seed = seed
            tok = TokenSelector(cfg, "cpu")(logits, torch.zeros(len(logits), dtype=torch.bool))
            counts = torch.bincount(tok, minlength=6).double()
            expected = probs.double() * len(logits)
            assert (counts[probs == 0] == 0).all(), kw
            sd = (expected * (1 - probs.double())).sqrt()
            assert ((counts - expected).abs() <= 5 * sd + 1).all(), (kw, counts, expected)


def test_sampler_is_seeded_and_continues_its_stream_in_an_adopted_generator():
    """Same seed, same draws; seed=None follows torch.manual_seed; a selector that moves to another
    generator mid-stream (what a decode graph's cache does) draws what it would have drawn."""
    from vlm_mamba.generation import TokenSelector

    logits = torch.randn(8, 50)
    done = torch.zeros(8, dtype=torch.bool)

    def draws(cfg, adopt_at=None):
        sel = TokenSelector(cfg, "cpu")
        out = []
        for i in range(6):
            if i == adopt_at:
                sel.adopt(torch.Generator())
            out.append(sel(logits, done.clone()))
        return torch.stack(out)

    cfg = GenerationConfig(do_sample=True, seed=4)
    a = draws(cfg)
    assert torch.equal(a, draws(cfg)) and torch.equal(a, draws(cfg, adopt_at=3))
    assert not torch.equal(a, draws(GenerationConfig(do_sample=True, seed=5)))
    torch.manual_seed(0)
    b = draws(GenerationConfig(do_sample=True))
    torch.manual_seed(0)
    assert torch.equal(b, draws(GenerationConfig(do_sample=True)))
