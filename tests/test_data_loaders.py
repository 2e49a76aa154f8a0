"""Streaming DataModules: batch contract, eval coverage across ranks x workers, determinism, exact
resume (by hand and through Lightning), corrupt samples skipped and counted."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import webdataset as wds

from vlm_mamba.data import CaptionDataModule, MixDataModule, VQADataModule
from vlm_mamba.data.collate import IGNORE_INDEX, Processor
from vlm_mamba.data.shapes import build_shapes_dataset
from vlm_mamba.data.shards import read_manifest
from vlm_mamba.data.transforms import FuyuTransform

COMMON = dict(img_size=32, patch_size=8, batch_size=4, shuffle_buffer=16, max_text_len=48)
TRAIN_KEYS = {"images", "input_ids", "attention_mask", "labels"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build_shapes_dataset(
        root, n_train=48, n_val=22, n_test=9, seed=0, image_size=64, vocab_size=400, shard_size=5
    )
    return root


def caption_dm(data_dir, **kw):
    return CaptionDataModule(data_dir=str(data_dir), **{"dataset": "shapes", **COMMON, **kw})


def vqa_dm(data_dir, **kw):
    return VQADataModule(data_dir=str(data_dir), **{**COMMON, **kw})


def _check_train_batch(batch, dm, b):
    assert set(batch) == TRAIN_KEYS
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    t = ids.shape[1]
    assert batch["images"].shape == (b, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert (
        ids.shape == mask.shape == labels.shape == (b, t)
        and ids.dtype == mask.dtype == labels.dtype == torch.long
    )
    tok = dm.tokenizer
    assert (ids[:, 0] == tok.bos_token_id).all() and (labels[:, 0] == IGNORE_INDEX).all()
    assert (mask[:, 0] == 1).all() and (mask.sum(1) == t).any()  # right padded, the longest fills the row
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tok.pad_token_id).all()
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    for row in range(b):
        n = int(mask[row].sum())
        assert (
            (mask[row, :n] == 1).all()
            and ids[row, n - 1] == tok.eos_token_id
            and labels[row, n - 1] == tok.eos_token_id
        )
    return [
        (
            ids[r][labels[r] == IGNORE_INDEX][mask[r][labels[r] == IGNORE_INDEX] == 1],
            ids[r][labels[r] != IGNORE_INDEX],
        )
        for r in range(b)
    ]


def test_caption_train_batch_contract(data_dir):
    dm = caption_dm(data_dir, batches_per_epoch=3)
    captions = {
        a["caption"]
        for a in json.loads((data_dir / "shapes" / "train" / "captions.json").read_text())["annotations"]
    }
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 == len(dm.train_dataloader())
    for batch in batches:
        for prompt, target in _check_train_batch(batch, dm, 4):
            assert prompt.tolist() == [dm.tokenizer.bos_token_id]  # caption prompt "": BOS only
            assert dm.tokenizer.decode(target) in captions


def test_vqa_train_batch_masks_the_prompt(data_dir):
    dm = vqa_dm(data_dir, batches_per_epoch=2)
    anns = json.loads((data_dir / "shapes_vqa" / "train" / "annotations.json").read_text())["annotations"]
    qs = json.loads((data_dir / "shapes_vqa" / "train" / "questions.json").read_text())["questions"]
    pairs = {(q["question"], a["multiple_choice_answer"]) for q, a in zip(qs, anns)}
    for batch in dm.train_dataloader():
        for prompt, target in _check_train_batch(batch, dm, 4):
            text = dm.tokenizer.decode(prompt)
            assert text.startswith("Question: ") and text.endswith(" Answer:")
            answer = dm.tokenizer.decode(target)
            assert answer.startswith(" ")  # encoded as the continuation of the prompt
            assert (text[len("Question: ") : -len(" Answer:")], answer.strip()) in pairs


def test_long_targets_are_cut_without_eos(data_dir):
    dm = caption_dm(data_dir, max_text_len=6)
    proc = dm.processor()
    ids, labels = proc.train_sequence("", "a large red circle, a small blue square and a green triangle.")
    assert len(ids) == 6 and ids[0] == dm.tokenizer.bos_token_id and dm.tokenizer.eos_token_id not in ids
    ids, labels = proc.train_sequence("Question: " + "why " * 40 + "? Answer:", "yes")
    assert (
        len(ids) <= 6 and labels.count(IGNORE_INDEX) == len(ids) - 2
    )  # prompt cut from the left; target kept


def test_caption_eval_batch_contract(data_dir):
    dm = caption_dm(data_dir, eval_batch_size=5)
    batches = list(dm.val_dataloader())
    assert len(batches) == len(dm.val_dataloader()) == 5  # ceil(22 / 5)
    b = batches[0]
    assert set(b) == {"images", "prompt_ids", "prompt_mask", "image_ids", "references"}
    assert (
        b["images"].shape == (5, 3, 32, 32) and b["prompt_ids"].tolist() == [[dm.tokenizer.bos_token_id]] * 5
    )
    assert all(isinstance(i, int) for i in b["image_ids"]) and all(len(r) == 5 for r in b["references"])
    gt = json.loads((data_dir / "shapes" / "val" / "captions.json").read_text())
    want = {
        i["id"]: sorted(a["caption"] for a in gt["annotations"] if a["image_id"] == i["id"])
        for i in gt["images"]
    }
    for iid, refs in zip(b["image_ids"], b["references"]):
        assert sorted(refs) == want[iid]


def test_vqa_eval_batch_groups_questions_by_image(data_dir):
    dm = vqa_dm(data_dir, eval_batch_size=3)
    b = next(iter(dm.val_dataloader()))
    keys = {
        "images",
        "image_index",
        "prompt_ids",
        "prompt_mask",
        "question_ids",
        "image_ids",
        "questions",
        "answers",
        "question_types",
        "answer_types",
    }
    assert set(b) == keys
    nq = len(b["question_ids"])
    assert b["images"].shape[0] == 3 and nq == 15 and b["image_index"].shape == (nq,)
    # each question points at its own image: question_id = image_id * 10 + k in the shapes files
    assert [q // 10 for q in b["question_ids"]] == b["image_ids"]
    assert b["image_index"].tolist() == [i for i in range(3) for _ in range(5)]
    mask = b["prompt_mask"]
    assert (mask[:, -1] == 1).all() and (
        b["prompt_ids"][mask == 0] == dm.tokenizer.pad_token_id
    ).all()  # left padded
    for row in range(nq):
        n = int(mask[row].sum())
        assert (mask[row, -n:] == 1).all() and b["prompt_ids"][row, -n] == dm.tokenizer.bos_token_id
        assert dm.tokenizer.decode(b["prompt_ids"][row]) == f"Question: {b['questions'][row]} Answer:"
    assert all(len(a) == 10 for a in b["answers"]) and set(b["answer_types"]) <= {"yes/no", "number", "other"}


def test_fuyu_mode_canvas_and_image_sizes(data_dir):
    dm = caption_dm(data_dir, vision_mode="fuyu", max_img_size=48, patch_size=16, batches_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    assert (
        batch["images"].shape == (4, 3, 48, 48) and batch["image_sizes"].tolist() == [[48, 48]] * 4
    )  # 64 -> 48
    with pytest.raises(ValueError, match="max_img_size=40 must be a multiple of patch_size=16"):
        caption_dm(data_dir, vision_mode="fuyu", max_img_size=40, patch_size=16).processor()
    t = FuyuTransform(448, 16)
    assert t.target_size(640, 480) == (448, 336) and t.target_size(200, 100) == (200, 100)  # never upscaled
    proc = Processor(dm.tokenizer, vision_mode="fuyu", patch_size=16, max_img_size=448)
    out = proc.stack_images(
        [torch.full((3, 20, 50), 255, dtype=torch.uint8), torch.full((3, 33, 16), 255, dtype=torch.uint8)]
    )
    assert out["images"].shape == (2, 3, 48, 64) and out["image_sizes"].tolist() == [[32, 64], [48, 16]]
    assert (out["images"][0, :, 20:] == 0).all() and (out["images"][0, :, :20, :50] > 0).all()


@pytest.mark.parametrize("module", ["captions", "vqa"])
def test_eval_coverage_two_ranks_two_workers(data_dir, module):
    seen, batches = [], 0
    for rank in range(2):
        make = caption_dm if module == "captions" else vqa_dm
        dm = make(data_dir, rank=rank, world_size=2, num_workers=2, eval_batch_size=3)
        loader = dm.val_dataloader()
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader)
        batches += len(rank_batches)
        for b in rank_batches:
            seen += b["image_ids"] if module == "captions" else b["question_ids"]
    manifest = read_manifest(data_dir / ("shapes" if module == "captions" else "shapes_vqa") / "val")
    gt_name = "captions.json" if module == "captions" else "questions.json"
    gt = json.loads((data_dir / manifest["dataset"] / "val" / gt_name).read_text())
    want = (
        [i["id"] for i in gt["images"]]
        if module == "captions"
        else [q["question_id"] for q in gt["questions"]]
    )
    assert len(seen) == len(set(seen)) == len(want)  # no duplicates, nothing missing
    assert set(seen) == set(want)


def _fingerprints(batches):
    return [(b["input_ids"].tolist(), round(float(b["images"].sum()), 3)) for b in batches]


def test_training_stream_is_a_function_of_seed_epoch_rank(data_dir):
    kw = dict(batches_per_epoch=4, num_workers=2)
    a = _fingerprints(caption_dm(data_dir, **kw).train_dataloader())
    assert a == _fingerprints(caption_dm(data_dir, **kw).train_dataloader())
    dm = caption_dm(data_dir, **kw)
    dm.set_epoch(1)
    assert _fingerprints(dm.train_dataloader()) != a
    assert _fingerprints(caption_dm(data_dir, seed=1, **kw).train_dataloader()) != a
    assert _fingerprints(caption_dm(data_dir, rank=1, world_size=2, **kw).train_dataloader()) != a


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_skips_consumed_batches(data_dir, num_workers, monkeypatch):
    kw = dict(batches_per_epoch=7, num_workers=num_workers)
    dm = vqa_dm(data_dir, **kw)
    loader = dm.train_dataloader()
    full_e0 = _fingerprints(loader)
    full_e1 = _fingerprints(loader)  # iterating again after a full epoch moves on to epoch 1
    assert loader.state_dict()["epoch"] == 1 and full_e1 != full_e0

    first = caption_dm(data_dir, **kw)  # a run that stops after 3 batches of epoch 0 ...
    del first
    dm = vqa_dm(data_dir, **kw)
    it = iter(dm.train_dataloader())
    head = _fingerprints([next(it) for _ in range(3)])
    state = dm.state_dict()
    del it
    assert state["epoch"] == 0 and state["batches_consumed"] == 3 and head == full_e0[:3]

    import vlm_mamba.data.collate as collate

    decoded = []
    real = collate.load_image
    monkeypatch.setattr(collate, "load_image", lambda data, **k: decoded.append(1) or real(data, **k))
    resumed = vqa_dm(data_dir, **kw)  # ... and resumes in a fresh process
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert _fingerprints(loader) == full_e0[3:]
    if num_workers == 0:
        assert len(decoded) == 4 * 4  # the 3 consumed batches were skipped without decoding
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 1)  # what Lightning calls at each epoch start
    assert _fingerprints(loader) == full_e1


def test_lightning_fit_resumes_mid_epoch_exactly(data_dir, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(
                (self.current_epoch, batch["input_ids"].sum().item(), round(float(batch["images"].sum()), 3))
            )
            return (self.w * batch["images"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(**kw):
        return L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            **kw,
        )

    kw = dict(batches_per_epoch=5, num_workers=0)
    full = Recorder()  # the uninterrupted run saves a checkpoint mid-epoch (after step 7 = epoch 1, batch 2)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}"
    )
    trainer(max_epochs=3, callbacks=[ckpt]).fit(full, datamodule=caption_dm(data_dir, **kw))
    assert len(full.seen) == 15 and len({s[1:] for s in full.seen}) > 10
    rest = Recorder()  # a crash after that checkpoint; the resumed run must see exactly the rest
    trainer(max_epochs=3, enable_checkpointing=False).fit(
        rest, datamodule=caption_dm(data_dir, **kw), ckpt_path=tmp_path / "step=7.ckpt"
    )
    assert rest.seen == full.seen[7:]


def test_mix_datamodule_mixes_both_tasks(data_dir):
    dm = MixDataModule(data_dir=str(data_dir), caption_weight=0.5, batches_per_epoch=6, **COMMON)
    texts = [dm.tokenizer.decode(ids) for b in dm.train_dataloader() for ids in b["input_ids"]]
    vqa = sum(t.startswith("Question:") for t in texts)
    assert 0 < vqa < len(texts)
    val = dm.val_dataloader()
    assert len(val) == 2 and "references" in next(iter(val[0])) and "image_index" in next(iter(val[1]))


def _corrupt_copy(data_dir, dst, dataset):
    """A copy of the dataset whose first val shard holds one truncated JPEG and one bad JSON sample."""
    shutil.copytree(data_dir / dataset, dst / dataset)
    shard = dst / dataset / "val" / "shard-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[1]["jpg"] = samples[1]["jpg"][:200]
    samples[3]["json"] = b"{not json"
    with wds.TarWriter(str(shard)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "json")})
    return dst


def test_corrupt_samples_are_skipped_and_counted(data_dir, tmp_path, caplog):
    root = _corrupt_copy(data_dir, tmp_path, "shapes_vqa")
    (root / "shapes_vqa" / "tokenizer.json").write_bytes(
        (data_dir / "shapes_vqa" / "tokenizer.json").read_bytes()
    )
    for workers in (0, 2):
        dm = vqa_dm(root, num_workers=workers, eval_batch_size=4)
        with caplog.at_level(logging.WARNING):
            ids = [i for b in dm.val_dataloader() for i in b["image_ids"]]
        assert dm.skipped_samples == 2
        assert len(set(ids)) == 22 - 2
    assert "2 corrupt sample(s) skipped" in caplog.text or "corrupt sample(s) skipped" in caplog.text


def test_corrupt_training_samples_are_dropped_from_their_batch(data_dir, tmp_path):
    shutil.copytree(data_dir / "shapes", tmp_path / "shapes")
    for shard in (tmp_path / "shapes" / "train").glob("shard-*.tar"):  # first sample of every shard
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        samples[0]["jpg"] = samples[0]["jpg"][:100]
        with wds.TarWriter(str(shard)) as w:
            for s in samples:
                w.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "json")})
    dm = caption_dm(tmp_path, batches_per_epoch=20, max_skip_fraction=0.5)
    sizes = [b["images"].shape[0] for b in dm.train_dataloader()]
    assert len(sizes) == 20 and 4 in sizes  # the epoch keeps its length
    assert dm.skipped_samples == 80 - sum(sizes) > 0  # every missing pair was counted


def test_bulk_corruption_raises(data_dir, tmp_path):
    shutil.copytree(data_dir / "shapes", tmp_path / "shapes")
    for shard in (tmp_path / "shapes" / "val").glob("shard-*.tar"):
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        with wds.TarWriter(str(shard)) as w:
            for s in samples:
                w.write({"__key__": s["__key__"], "jpg": b"garbage", "json": s["json"]})
    dm = caption_dm(tmp_path)
    with pytest.raises(RuntimeError, match="corrupt .*max_skip_fraction"):
        list(dm.val_dataloader())


def test_bad_config_is_named(data_dir):
    with pytest.raises(ValueError, match="data.vision_mode='vit'"):
        caption_dm(data_dir, vision_mode="vit")
    with pytest.raises(ValueError, match=r"data.prompt=.*must contain '\{q\}'"):
        vqa_dm(data_dir, prompt="Q: A:")
    with pytest.raises(ValueError, match="data.rank"):
        caption_dm(data_dir, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        caption_dm(
            data_dir, dataset="coco", tokenizer=str(data_dir / "shapes" / "tokenizer.json")
        ).train_dataloader()
