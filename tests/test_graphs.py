"""The prefill graphs' CPU-checkable parts (``vlm_mamba.models.graphs``): the functions a graph
captures equal the eager prefill per element (the bucket's left pads are identity steps), the
bucket sizes, the cache's bookkeeping (signatures, LRU, a refused capture), and that asking for
graphs where none can run changes nothing. The captures themselves: ``tests/test_gpu_prefill.py``."""

import logging

import pytest
import torch
import torch.nn.functional as F

from vlm_mamba import create_model
from vlm_mamba.models import graphs
from vlm_mamba.models.vlm import _flatten_state, _unflatten_state


def _perturbed(ssm="mamba1"):
    torch.manual_seed(0)
    model = create_model("tiny", language={"ssm": ssm}, eos_token_id=3, pad_token_id=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_prompt_buckets():
    assert [graphs.prompt_bucket(n) for n in (1, 16, 17, 32, 33, 100, 512, 513, 1024, 1025)] == [
        16, 16, 32, 32, 64, 128, 512, 1024, 1024, 1536,
    ]  # fmt: skip
    assert all(graphs.prompt_bucket(n) >= n for n in range(1, 3000))


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2"])
def test_captured_functions_equal_the_eager_prefill(ssm):
    """_image_prefill_flat is prefill_images; _prompt_prefill_flat on prompts left-padded to their
    bucket gives the eager prompt prefill's last logits and states (rows of several lengths)."""
    model = _perturbed(ssm)
    lm = model.language
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        state = model.prefill_images(images)
        flat = model._image_prefill_flat(images)
        for a, b in zip(_flatten_state(state), flat):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        ids = torch.randint(4, 200, (3, 11))
        mask = torch.ones(3, 11, dtype=torch.bool)
        mask[1, :4] = False
        mask[2, :10] = False  # one real token
        txt = lm.embed(ids)
        ref = lm(inputs_embeds=txt, attention_mask=mask, state=state, return_state=True, logits="last")
        pad = graphs.prompt_bucket(11) - 11
        out = model._prompt_prefill_flat(
            F.pad(txt, (0, 0, pad, 0)), F.pad(mask, (pad, 0), value=False), *_flatten_state(state)
        )
    torch.testing.assert_close(out[0], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
    for a, b in zip(_flatten_state(ref.state), out[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_with_prefill_graph_on_the_cpu_is_the_eager_path(caplog, monkeypatch):
    """The default (None: graphs where they can be captured) runs op by op on the CPU without a
    word; prefill_graph=True says why it cannot; all three give the same tokens."""
    from vlm_mamba.models import vlm as vlm_module

    monkeypatch.setattr(vlm_module, "_GRAPH_LOGGED", set())
    model = _perturbed()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 200, (2, 7))
    with caplog.at_level(logging.INFO, logger="vlm_mamba.models.vlm"):
        default = model.generate(images, ids, max_new_tokens=6)
        assert not [r for r in caplog.records if "CUDA graphs" in r.getMessage()]
        a = model.generate(images, ids, max_new_tokens=6, prefill_graph=True)
        assert any(
            "without CUDA graphs" in r.getMessage() and "cpu" in r.getMessage() for r in caplog.records
        )
    b = model.generate(images, ids, max_new_tokens=6, prefill_graph=False)
    assert torch.equal(a, b) and torch.equal(default, b)
    assert graphs.graph_cache(model).captures == 0


@pytest.fixture
def fake_capture(monkeypatch):
    """CapturedCall replaced by an eager call that records the shapes it was "captured" for (the
    list returned); a function marked ``refuse`` fails its capture, as an op refusing capture does."""
    made = []

    class FakeCall:
        def __init__(self, fn, inputs, pool):
            if getattr(fn, "refuse", False):
                raise RuntimeError("operation not permitted when stream is capturing")
            made.append(tuple(t.shape for t in inputs))
            self.fn = fn

        def __call__(self, inputs):
            return [o.clone() for o in self.fn(*inputs)]

    monkeypatch.setattr(graphs, "CapturedCall", FakeCall)
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: object())
    return made


def test_a_signature_is_captured_the_second_time_it_is_seen(fake_capture):
    """Shapes seen once run eagerly (None), so a stream of new shapes never captures; the second
    sighting captures and later ones replay."""
    made = fake_capture
    model = torch.nn.Linear(4, 4)
    cache = graphs.GraphCache(model, max_graphs=2)

    def fn(x):
        return [model(x)]

    for b in range(1, 40):  # always a new shape: never captured
        assert cache.run("f", fn, [torch.randn(b, 4)]) is None
    assert cache.captures == 0 and len(cache.seen) <= 32
    x = torch.randn(1, 4)
    assert cache.run("f", fn, [x]) is None  # (1, 4) was evicted from the sightings: first again
    out = cache.run("f", fn, [x])  # second: captured
    torch.testing.assert_close(out[0], model(x))
    cache.run("f", fn, [x])
    assert cache.captures == 1 and made == [(torch.Size([1, 4]),)]


def test_graph_cache_keys_lru_and_a_refused_capture(fake_capture, monkeypatch, caplog):
    """One capture per (name, shapes, dtypes, autocast, weights' storage); the oldest dropped beyond
    max_graphs; a capture that raises is logged once and the name then runs eagerly (None)."""
    made = fake_capture
    model = torch.nn.Linear(4, 4)
    cache = graphs.GraphCache(model, max_graphs=2, capture_after=1)

    def fn(x):
        return [model(x)]

    x1, x2, x3 = torch.randn(1, 4), torch.randn(2, 4), torch.randn(3, 4)
    torch.testing.assert_close(cache.run("f", fn, [x1])[0], model(x1))
    cache.run("f", fn, [torch.randn(1, 4)])  # same signature: replayed
    assert made == [(torch.Size([1, 4]),)]
    cache.run("f", fn, [x2])
    cache.run("f", fn, [x3])  # evicts the (1, 4) capture
    assert len(cache.calls) == 2 and cache.captures == 3
    cache.run("f", fn, [x1])
    assert cache.captures == 4  # captured again
    with torch.no_grad():
        model.weight.data = model.weight.data.clone()  # new storage: a new signature
    cache.run("f", fn, [x1])
    assert cache.captures == 5

    def bad(x):
        return [x]

    bad.refuse = True
    monkeypatch.setattr(graphs.torch.cuda, "synchronize", lambda: None)
    with caplog.at_level(logging.WARNING, logger="vlm_mamba.models.graphs"):
        assert cache.run("g", bad, [x1]) is None
        assert cache.run("g", bad, [x1]) is None
    assert sum("capture failed" in r.message for r in caplog.records) == 1
    assert _unflatten_state(_flatten_state(_unflatten_state([x1, x2])))[0].ssm is x2
