"""The training stream's memory cache (``data.cache_mb``): the same batches as without it, the
shards read and the images decoded once per process, the budget respected, corrupt data not cached."""

from __future__ import annotations

import shutil

import pytest
import torch
import webdataset as wds

from vlm_mamba.data import MixDataModule
from vlm_mamba.data.collate import MemoryBudget
from vlm_mamba.data.shapes import build_shapes_dataset

COMMON = dict(img_size=32, patch_size=8, batch_size=4, shuffle_buffer=16, max_text_len=48)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_shapes_dataset(
        root, n_train=24, n_val=4, n_test=4, seed=0, image_size=64, vocab_size=400, shard_size=5
    )
    return root


def mix_dm(root, **kw):
    return MixDataModule(data_dir=str(root), **{**COMMON, "batches_per_epoch": 15, **kw})


def _epochs(loader, n):
    return [batch for _ in range(n) for batch in loader]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_cache_gives_the_same_batches_and_decodes_each_image_once(data_dir, monkeypatch):
    import vlm_mamba.data.collate as collate
    import vlm_mamba.data.pipeline as pipeline

    plain = _epochs(mix_dm(data_dir).train_dataloader(), 3)
    decoded, opened = [], []
    real_load, real_iter = collate.load_image, pipeline.iter_tar_samples
    monkeypatch.setattr(collate, "load_image", lambda data, **k: decoded.append(data) or real_load(data, **k))
    monkeypatch.setattr(
        pipeline, "iter_tar_samples", lambda urls, **k: real_iter(opened.extend(urls) or urls, **k)
    )
    dm = mix_dm(data_dir, cache_mb=64)
    cached = _epochs(dm.train_dataloader(), 3)
    _assert_same(plain, cached)
    assert len(decoded) == len(set(decoded))  # every image decoded once (caption and VQA shards share them)
    assert len(opened) == len(set(opened))  # every shard read from its tar once
    stream = dm._train_loader.dataset
    assert stream.processor.cache.left < 64 * 2**20 and stream.shard_cache.shards


def test_cache_stops_growing_when_the_budget_is_spent(data_dir):
    dm = mix_dm(data_dir, cache_mb=0.05)  # ~52 KB: a few images, no whole shard
    cached = _epochs(dm.train_dataloader(), 2)
    _assert_same(_epochs(mix_dm(data_dir).train_dataloader(), 2), cached)
    proc = dm._train_loader.dataset.processor
    assert 0 < len(proc._images) < 24 and proc.cache.left >= 0


def test_undecodable_images_and_unreadable_shards_are_not_cached(data_dir, tmp_path):
    for name in ("shapes", "shapes_vqa"):
        shutil.copytree(data_dir / name, tmp_path / name)
    shard = sorted((tmp_path / "shapes" / "train").glob("shard-*.tar"))[0]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[0]["jpg"] = samples[0]["jpg"][:100]  # undecodable
    with wds.TarWriter(str(shard)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "json")})
    plain, cached = (
        mix_dm(tmp_path, max_skip_fraction=0.5),
        mix_dm(tmp_path, max_skip_fraction=0.5, cache_mb=64),
    )
    _assert_same(_epochs(plain.train_dataloader(), 2), _epochs(cached.train_dataloader(), 2))
    assert cached.skipped_samples == plain.skipped_samples > 0  # skipped (and counted) at every visit
    assert samples[0]["jpg"] not in cached._train_loader.dataset.processor._images
    assert str(shard) in cached._train_loader.dataset.shard_cache.shards  # the tar itself read cleanly

    torn = sorted((tmp_path / "shapes_vqa" / "train").glob("shard-*.tar"))[-1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a tar cut short
    dm = mix_dm(tmp_path, max_skip_fraction=0.9, cache_mb=64)
    _epochs(dm.train_dataloader(), 2)
    assert str(torn) not in dm._train_loader.dataset.shard_cache.shards and dm._train_loader.dataset.skipped


def test_memory_budget():
    b = MemoryBudget(1 / 1024)  # 1 KiB
    assert b.take(1000) and not b.take(100) and b.take(24) and b.left == 0
    with pytest.raises(ValueError):
        MemoryBudget(-1)
    with pytest.raises(ValueError, match="cache_mb"):
        MixDataModule(data_dir="x", cache_mb=-1)
