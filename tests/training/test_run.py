"""train.py end to end on a small generated shapes dataset with the `tiny` model.

In-process runs compose conf/ with Hydra's compose API and call ``vlm_mamba.training.run.train``;
multirun, the 2-process DDP run and the missing-data message run ``train.py`` as a subprocess
(Lightning's DDP launcher re-runs the command line, so it cannot start inside pytest's process).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vlm_mamba.training.run import MissingDataError, train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small shapes dataset (captions + VQA shards, tokenizer) shared by every test here."""
    from vlm_mamba.data.shapes import build_shapes_dataset

    root = tmp_path_factory.mktemp("shapes_data")
    build_shapes_dataset(root, n_train=48, n_val=16, n_test=8, shard_size=16, vocab_size=400)
    return root


def _small(data_dir: Path) -> list[str]:
    """Overrides for a seconds-long CPU run of the tiny model."""
    return [
        "model=tiny",
        "trainer=cpu",
        f"paths.data_dir={data_dir}",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.samples_per_epoch=16",
        "data.shuffle_buffer=8",
        "data.num_workers=0",
        "module.warmup_steps=1",
        "module.val_generation.max_new_tokens=4",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_progress_bar=false",
        "callbacks.model_summary=null",
    ]


def _cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={out}"])


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from every CSV version under ``run_dir``."""
    out: dict[int, float] = {}
    for f in sorted(run_dir.rglob("metrics.csv")):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


def _run_script(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLM_MAMBA_LOGS": str(tmp_path / "logs"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_fast_dev_run_on_tiny_shapes(experiment, shapes_dir, tmp_path):
    """Each experiment's deltas hold with the tiny model on shapes data (COCO/VQAv2 swapped for shapes)."""
    swap = []
    if "coco" in experiment:
        swap = ["data=shapes_caption"]
    elif "vqa" in experiment:
        swap = ["data=shapes_vqa"]
    cfg = _cfg([f"experiment={experiment}", *swap, *_small(shapes_dir), "debug=fast_dev_run"], tmp_path)
    metrics, objs = train(cfg)
    assert objs["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/loss" in metrics
    task = cfg.data._target_.rsplit(".", 1)[-1]
    if task in ("CaptionDataModule", "MixDataModule"):
        assert "val/CIDEr" in metrics and "val/Bleu_4" in metrics
    if task in ("VQADataModule", "MixDataModule"):
        assert 0.0 <= metrics["val/vqa_acc"] <= 100.0
    mc = objs["model_config"]
    tok = objs["datamodule"].tokenizer
    assert (mc.bos_token_id, mc.eos_token_id, mc.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    if experiment.endswith("_lora"):
        trainable = [n for n, p in objs["module"].model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or n.startswith("bridger.") for n in trainable)


def _straight_and_resumed(common: list[str], steps: int, stop: int, tmp_path: Path):
    """``steps`` steps straight (under tmp_path/full) and ``stop`` steps + resume(ckpt_path=last) to
    ``steps`` (under tmp_path/part): their train losses by step."""
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    train(_cfg([*common, f"trainer.max_steps={steps}"], full_dir))
    _, objs = train(_cfg([*common, f"trainer.max_steps={stop}"], part_dir))
    assert objs["trainer"].global_step == stop
    _, objs = train(_cfg([*common, f"trainer.max_steps={steps}", "ckpt_path=last"], part_dir))
    assert objs["trainer"].global_step == steps
    return _losses(full_dir), _losses(part_dir)


def test_resume_from_last_gives_the_uninterrupted_losses(shapes_dir, tmp_path):
    """12 steps straight vs 7 steps + resume(ckpt_path=last) to 12: the same losses at steps 8..12.

    4 batches per epoch (so the stop falls mid-epoch and the run crosses epochs), 2 data workers
    (round-robin batch order), validation in between, total_steps fixed so the schedule is the same.
    """
    common = [
        *_small(shapes_dir),
        "data.num_workers=2",
        "module.total_steps=12",
        "module.val_generation.enabled=false",
        "trainer.val_check_interval=5",
        "callbacks.last_checkpoint.every_n_train_steps=7",
        "test=false",
    ]
    full, part = _straight_and_resumed(common, 12, 7, tmp_path)
    assert sorted(full) == list(range(12)) and sorted(part) == list(range(12))
    assert [part[s] for s in range(12)] == [full[s] for s in range(12)]
    # the last checkpoint carries the data position and loads without unpickling code
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and "tokenizer_json" in ckpt


@pytest.mark.parametrize("rng_state", [True, False])
def test_resume_restores_the_random_stream_of_dropout(shapes_dir, tmp_path, rng_state):
    """With LoRA dropout (fresh masks every step) a resumed run gives the uninterrupted losses
    only because the checkpoint carries the RNG states (callbacks.rng_state): without that
    callback the same resume draws other masks and the losses after the resume point differ."""
    common = [
        *_small(shapes_dir),
        "lora=language",
        "model.lora.dropout=0.3",
        "module.total_steps=8",
        "module.val_generation.enabled=false",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        "test=false",
        *([] if rng_state else ["~callbacks.rng_state"]),
    ]
    full, part = _straight_and_resumed(common, 8, 4, tmp_path)
    assert sorted(full) == sorted(part) == list(range(8))
    assert [part[s] for s in range(4)] == [full[s] for s in range(4)]
    same_after = [part[s] for s in range(4, 8)] == [full[s] for s in range(4, 8)]
    assert same_after is rng_state, [(s, full[s], part[s]) for s in range(4, 8)]


def test_export_writes_a_loadable_model_directory(shapes_dir, tmp_path):
    from vlm_mamba.data.tokenizer import TextTokenizer
    from vlm_mamba.export import main as export_main
    from vlm_mamba.models.vlm import VLMamba

    cfg = _cfg([*_small(shapes_dir), "trainer.max_steps=2", "test=false", "lora=language"], tmp_path / "run")
    _, objs = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    model = VLMamba.from_pretrained(tmp_path / "out")
    tok = TextTokenizer.load(tmp_path / "out")
    assert tok.special_ids() == objs["datamodule"].tokenizer.special_ids()
    ref = objs["module"].model.eval()
    images, ids = torch.randn(1, 3, 32, 32), torch.tensor([[tok.bos_token_id, 5, 6]])
    assert torch.equal(model(images, ids).logits, ref(images, ids).logits)
    assert export_main([str(ckpt), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = VLMamba.from_pretrained(tmp_path / "merged")
    assert merged.config.lora is None
    torch.testing.assert_close(merged(images, ids).logits, ref(images, ids).logits, rtol=1e-4, atol=1e-5)
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 1
    # exporting into the run folder (or any folder export did not write) is refused; nothing is lost
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    assert export_main([str(ckpt), str(tmp_path / "run")]) == 1
    assert export_main([str(ckpt), str(tmp_path / "run" / "checkpoints")]) == 1
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    # a rerun over its own earlier output replaces it
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_debug_overfit_memorises_one_batch(shapes_dir, tmp_path):
    cfg = _cfg(
        [*_small(shapes_dir), "debug=overfit", "trainer.max_steps=40", "trainer.detect_anomaly=false"],
        tmp_path,
    )
    train(cfg)
    losses = _losses(tmp_path)
    assert len(losses) == 40
    assert losses[39] < 0.3 * losses[0]  # the same batch every step: memorised


def test_missing_shards_fail_with_the_prepare_command(tmp_path):
    r = _run_script(
        ["experiment=coco_caption", "trainer=cpu", f"paths.data_dir={tmp_path / 'nodata'}"], tmp_path
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "not prepared" in r.stderr and "python data/prepare_coco.py --karpathy" in r.stderr
    assert str(tmp_path / "nodata") in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_error_in_process(tmp_path):
    cfg = _cfg(["data=vqav2", f"paths.data_dir={tmp_path}"], tmp_path)
    with pytest.raises(MissingDataError, match="prepare_vqav2.py --questions"):
        train(cfg)


def test_multirun_two_values(shapes_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = _run_script(
        [
            "-m",
            *_small(shapes_dir),
            "trainer.max_steps=2",
            "test=false",
            "trainer.val_check_interval=2",
            "module.lr=1e-3,3e-3",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert _losses(sweep / job)
    lrs = [
        torch.load(sweep / j / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["lr"]
        for j in ("0", "1")
    ]
    assert lrs == [1e-3, 3e-3]


def test_ddp_sim_two_process_cpu_run(shapes_dir, tmp_path):
    run = tmp_path / "ddp"
    r = _run_script(
        [
            *_small(shapes_dir),
            "trainer=ddp_sim",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=2",
            "trainer.val_check_interval=3",
            "test=false",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    metrics = [row for f in run.rglob("metrics.csv") for row in csv.DictReader(f.open())]
    assert any(row.get("val/CIDEr") for row in metrics) and any(row.get("val/loss") for row in metrics)


def test_wandb_offline_run(shapes_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _cfg([*_small(shapes_dir), "logger=wandb", "trainer.max_steps=2", "test=false"], tmp_path)
    metrics, objs = train(cfg)
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))
    assert "train/loss" in metrics
