"""The Hydra config tree composes, validates and instantiates (no training here: tests/test_train.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlm_mamba.config import VLMambaConfig
from vlm_mamba.registry import get_config, list_models
from vlm_mamba.training.run import ConfigError, instantiate_list, model_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path | None = None, hydra: bool = False):
    extra = [f"paths.output_dir={tmp_path}"] if tmp_path is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra], return_hydra_config=hydra)


@pytest.mark.parametrize("name", list_models())
def test_model_yaml_equals_registry(name):
    data = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    assert VLMambaConfig.model_validate(data) == get_config(name)


def test_expected_groups_and_options_exist():
    want = {
        "model": {"tiny", "demo", "small", "base"},
        "vision": {"encoder", "fuyu"},
        "lora": {"none", "language", "all"},
        "data": {"shapes_caption", "shapes_vqa", "coco_caption", "vqav2"},
        "trainer": {"cpu", "gpu", "ddp", "fsdp", "ddp_sim", "fsdp_sim"},
        "logger": {"csv", "tensorboard", "wandb", "none"},
        "experiment": {"demo", "coco_caption", "vqav2", "coco_caption_lora", "vqav2_lora"},
        "hparams_search": {"optuna"},
        "debug": {"fast_dev_run", "overfit"},
    }
    for group, names in want.items():
        have = {p.stem for p in (CONF / group).glob("*.yaml")}
        assert names <= have, (group, names - have)
    assert (CONF / "hydra" / "launcher" / "submitit_slurm.yaml").is_file()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}"], tmp_path)
    mc = model_config(cfg.model)
    assert cfg.module._target_.endswith("VLMambaLitModule")
    assert cfg.data.img_size == mc.vision.img_size and cfg.data.vision_mode == mc.vision_mode
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if experiment.endswith("_lora"):
        assert mc.lora is not None and mc.lora.apply_to == "language"


def test_vision_and_lora_groups_set_the_model_and_the_data_transform(tmp_path):
    cfg = _compose(["vision=fuyu", "lora=all"], tmp_path)
    mc = model_config(cfg.model)
    assert mc.vision_mode == "fuyu" and cfg.data.vision_mode == "fuyu"
    assert mc.lora is not None and mc.lora.apply_to == "both"
    assert model_config(_compose(["lora=none"], tmp_path).model).lora is None


def test_unknown_or_invalid_model_keys_are_errors_naming_the_key(tmp_path):
    cfg = _compose(["+model.language.d_modle=64"], tmp_path)
    with pytest.raises(ConfigError, match=r"model\.language\.d_modle: unknown key"):
        model_config(cfg.model)
    cfg = _compose(["model.vision.patch_size=7"], tmp_path)
    with pytest.raises(ConfigError, match=r"img_size=32 is not a multiple of vision.patch_size=7"):
        model_config(cfg.model)


@pytest.mark.parametrize("name", ["cpu", "ddp_sim", "fsdp_sim"])
def test_cpu_trainers_instantiate(name, tmp_path):
    import hydra

    cfg = _compose([f"trainer={name}"], tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.precision == "32-true"
    if name in ("ddp_sim", "fsdp_sim"):
        assert trainer.num_devices == 2
        assert trainer.strategy._process_group_backend == "gloo"


def test_gpu_trainers_compose_with_bf16(tmp_path):
    for name in ("gpu", "ddp", "fsdp"):
        cfg = _compose([f"trainer={name}"], tmp_path)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    cfg = _compose(["trainer=fsdp"], tmp_path)
    assert cfg.trainer.strategy._target_ == "vlm_mamba.training.fsdp.FSDP2Strategy"
    assert cfg.trainer.inference_mode is False


def test_fsdp_strategy_is_fsdp2_with_one_checkpointing_switch(tmp_path):
    import hydra
    from lightning.pytorch.strategies import ModelParallelStrategy

    from vlm_mamba.training.fsdp import FSDP2Strategy

    cfg = _compose(["trainer=fsdp"], tmp_path)
    s = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(s, FSDP2Strategy) and isinstance(s, ModelParallelStrategy)
    assert s.reshard_after_forward and s._save_distributed_checkpoint and s.param_dtype == "auto"
    with pytest.raises(ValueError, match="model.language.gradient_checkpointing"):
        FSDP2Strategy(activation_checkpointing=True)


@pytest.mark.parametrize("name", ["csv", "tensorboard", "none"])
def test_loggers_instantiate(name, tmp_path):
    cfg = _compose([f"logger={name}"], tmp_path)
    loggers = instantiate_list(cfg.get("logger"), "logger")
    assert len(loggers) == (0 if name == "none" else 1)
    for lg in loggers:
        assert str(lg.save_dir).startswith(str(tmp_path))


def test_default_callbacks_resume_and_monitor(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

    from vlm_mamba.training.callbacks import RNGStateCheckpoint

    cfg = _compose(["optimized_metric=val/CIDEr", "optimized_mode=max"], tmp_path)
    cbs = instantiate_list(cfg.callbacks, "callbacks")
    ckpts = [c for c in cbs if isinstance(c, ModelCheckpoint)]
    last = next(c for c in ckpts if c.save_last)
    best = next(c for c in ckpts if c.monitor)
    assert last._every_n_train_steps > 0 and best.monitor == "val/CIDEr" and best.mode == "max"
    assert last.dirpath == best.dirpath == str(tmp_path / "checkpoints")
    assert any(isinstance(c, ThroughputMonitor) for c in cbs)
    assert any(isinstance(c, RNGStateCheckpoint) for c in cbs)


def test_sweep_and_launcher_configs_compose(tmp_path):
    cfg = _compose(["hparams_search=optuna", "experiment=demo"], tmp_path, hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert "module.lr" in sweeper.params and cfg.optimized_metric == "val/loss"
    cfg = _compose(["hparams_search=optuna_cider"], tmp_path, hydra=True)
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/CIDEr"
    cfg = _compose(["hydra/launcher=submitit_slurm"], tmp_path, hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_debug_presets(tmp_path):
    cfg = _compose(["debug=fast_dev_run"], tmp_path)
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 0
    cfg = _compose(["debug=overfit"], tmp_path)
    assert cfg.callbacks.overfit._target_ == "vlm_mamba.training.callbacks.OverfitBatches"
    assert cfg.trainer.limit_val_batches == 0 and cfg.module.val_generation.enabled is False


def test_data_paths_follow_paths_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_MAMBA_DATA", str(tmp_path / "elsewhere"))
    cfg = _compose(["data=vqav2"], tmp_path)
    assert cfg.data.data_dir == str(tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere") in cfg.data.prepare_command
    cfg = _compose(["data=coco_caption", f"paths.data_dir={tmp_path}"], tmp_path)
    assert cfg.data.data_dir == str(tmp_path) and cfg.data.dataset == "coco"
