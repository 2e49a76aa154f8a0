"""The logic behind ``train.py``: composed Hydra config -> validated model config -> build -> fit -> test.

Hydra composes; this module turns the result into objects. The ``model`` subtree is validated
into :class:`~vlm_mamba.config.VLMambaConfig` (unknown keys are errors naming the key); ``data``,
``module``, ``trainer``, ``callbacks`` and ``logger`` nodes are ``_target_`` nodes built with
``hydra.utils.instantiate`` (lightning-hydra-template's ``train.py``).

User mistakes (an invalid model config, unprepared data, a diverged run) raise
:class:`TrainingError` subclasses whose message says what to do; ``train.py`` prints the message
and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from ..config import VLMambaConfig

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A problem the user fixes from the command line; its message is the whole report."""


class ConfigError(TrainingError):
    """The composed config is invalid (names the key)."""


class MissingDataError(TrainingError):
    """The dataset's shards are not prepared (says the command that prepares them)."""


class NonFiniteLossError(TrainingError):
    """Training stopped on a NaN/inf loss (names the checkpoint written at that point)."""


# ---------------------------------------------------------------------- resolvers
def _auto_precision() -> str:
    """``bf16-mixed`` where a CUDA device supports it, else full fp32 (CPU bf16 autocast is slow)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    """OmegaConf resolvers the configs use: ``${vlm_precision:}``. Idempotent."""
    if not OmegaConf.has_resolver("vlm_precision"):
        OmegaConf.register_new_resolver("vlm_precision", _auto_precision)


register_resolvers()


# ---------------------------------------------------------------------- builders
def model_config(node: DictConfig | Mapping[str, Any]) -> VLMambaConfig:
    """Validate the ``model`` subtree into a :class:`VLMambaConfig`; errors name ``model.<key>``."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        return VLMambaConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in ("model", *err["loc"]))
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (not a VLMambaConfig field; typo?)")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid model config:\n" + "\n".join(lines)) from None


def fsdp_strategy(**kwargs: Any):
    """The ``trainer=fsdp`` strategy: :class:`~vlm_mamba.training.fsdp.FSDP2Strategy` (FSDP2 through
    Lightning's ``ModelParallelStrategy``; every residual Mamba ``Block`` of both towers is a unit).

    Kept for configs written against the FSDP1 version: its ``sharding_strategy`` maps to
    ``reshard_after_forward`` (FULL_SHARD: true, SHARD_GRAD_OP: false), ``state_dict_type`` to
    ``save_distributed_checkpoint`` (sharded: true, full: false); ``activation_checkpointing`` is
    refused (the model config's ``gradient_checkpointing`` is the one mechanism)."""
    from .fsdp import FSDP2Strategy

    sharding = kwargs.pop("sharding_strategy", None)
    if sharding is not None:
        if sharding not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ConfigError(
                f"trainer.strategy.sharding_strategy={sharding!r}: FSDP2 offers FULL_SHARD or SHARD_GRAD_OP "
                "(trainer.strategy.reshard_after_forward=true/false)"
            )
        kwargs.setdefault("reshard_after_forward", sharding == "FULL_SHARD")
    sdt = kwargs.pop("state_dict_type", None)
    if sdt is not None:
        if sdt not in ("full", "sharded"):
            raise ConfigError(f"trainer.strategy.state_dict_type={sdt!r}: expected 'sharded' or 'full'")
        kwargs.setdefault("save_distributed_checkpoint", sdt == "sharded")
    try:
        return FSDP2Strategy(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def instantiate_list(node: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``_target_`` child of a callbacks/logger node (others are ignored)."""
    out: list[Any] = []
    if not node:
        return out
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{what} config must be a mapping of name -> {{_target_: ...}}, got {type(node).__name__}"
        )
    names = []
    for name, child in node.items():
        if isinstance(child, DictConfig) and "_target_" in child:
            log.debug("instantiating %s.%s <%s>", what, name, child._target_)
            out.append(hydra.utils.instantiate(child))
            names.append(str(name))
    if names:
        log.info("%s: %s", what, ", ".join(names))
    return out


def sync_tokenizer(model_cfg: VLMambaConfig, tokenizer: Any) -> VLMambaConfig:
    """Take BOS/EOS/PAD ids from the data's tokenizer; the vocabulary must fit ``language.vocab_size``.

    The tokenizer is trained at prepare time, so its ids are facts the architecture config cannot
    know in advance; a vocabulary larger than the embedding table is an error naming the key.
    """
    if tokenizer is None:
        return model_cfg
    if tokenizer.vocab_size > model_cfg.language.vocab_size:
        raise ConfigError(
            f"model.language.vocab_size={model_cfg.language.vocab_size} is smaller than the data's tokenizer "
            f"vocabulary ({tokenizer.vocab_size}); set model.language.vocab_size={tokenizer.vocab_size} "
            "or prepare the data with a smaller tokenizer"
        )
    ids = tokenizer.special_ids()
    changed = {k: v for k, v in ids.items() if getattr(model_cfg, k) != v}
    if changed:
        log.info("special token ids from the tokenizer: %s", changed)
        model_cfg = model_cfg.model_copy(update=changed)
        VLMambaConfig.model_validate(model_cfg.to_dict())
    return model_cfg


# ---------------------------------------------------------------------- the run
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from ``cfg``, fit, then test. Returns (metrics, objects).

    ``metrics`` holds every logged scalar after fit (``val/...``) and test (``test/...``);
    ``objects`` the built ``cfg``, ``datamodule``, ``module``, ``trainer``, ``model_config``.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    model_cfg = model_config(cfg.model)

    datamodule = build_datamodule(cfg)
    tokenizer = getattr(datamodule, "tokenizer", None)
    model_cfg = sync_tokenizer(model_cfg, tokenizer)

    log.info("instantiating module <%s>", cfg.module._target_)
    module = hydra.utils.instantiate(cfg.module, model=model_cfg, _convert_="all")
    callbacks = instantiate_list(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_list(cfg.get("logger"), "logger")
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="partial"
    )
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "model_config": model_cfg,
    }
    for lg in trainer.loggers:
        lg.log_hyperparams(_flat_hparams(cfg, module))

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        log.info("fit (ckpt_path=%s)", cfg.get("ckpt_path"))
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        if module.nonfinite is not None:
            nf = module.nonfinite
            raise NonFiniteLossError(
                f"training stopped: the loss was {nf['loss']} at step {nf['step']}. The weights before that "
                f"batch are in {nf['ckpt']}. Lower module.lr, raise module.warmup_steps or check the data."
            )
        metrics.update(_scalars(trainer.callback_metrics))
    if cfg.get("test", False):
        ckpt = _best_checkpoint(trainer) if cfg.get("train", True) else cfg.get("ckpt_path")
        if _has_split(datamodule, "test"):
            log.info("test (ckpt_path=%s)", ckpt)
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            metrics.update(_scalars(trainer.callback_metrics))
        else:
            log.warning("test=true but the data has no prepared test split; skipped")
    return metrics, objects


def run(cfg: DictConfig) -> float | None:
    """``train.py``'s body: print the config, train, return ``cfg.optimized_metric`` (for sweeps)."""
    print_config_tree(cfg, echo=bool(cfg.get("print_config", True)))
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        log.warning(
            "optimized_metric=%r was never logged (logged: %s): nothing to return to a sweeper. "
            "Does validation run (trainer.val_check_interval, limit_val_batches)?",
            name,
            sorted(metrics),
        )
        return None
    value = metrics[name]
    log.info("%s = %s", name, value)
    return value


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    """The monitored ModelCheckpoint's best path if there is one, else None (the current weights)."""
    cb = trainer.checkpoint_callback
    for c in trainer.checkpoint_callbacks:
        if getattr(c, "monitor", None) and c.best_model_path:
            cb = c
            break
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    return path or None


def _has_split(datamodule: Any, split: str) -> bool:
    return bool(getattr(datamodule, f"{split}_split", True))


def _flat_hparams(cfg: DictConfig, module: L.LightningModule) -> dict[str, Any]:
    """The resolved run config for the loggers' hparams tables (model, module, data, trainer, seed)."""
    out: dict[str, Any] = {}
    for key in (
        "model",
        "module",
        "data",
        "trainer",
        "callbacks",
        "seed",
        "task_name",
        "run_name",
        "tags",
        "ckpt_path",
    ):
        if key in cfg:
            value = cfg[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    if hasattr(module, "model") and hasattr(module.model, "num_parameters"):
        out["params"] = module.model.num_parameters()
    return out


# ---------------------------------------------------------------------- data
def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """Instantiate ``cfg.data``, let it build what it can (the shapes set), check the shards are there.

    Unprepared shards or tokenizer become a :class:`MissingDataError` carrying ``data.prepare_command``.
    In a multi-process run this happens in the launching process (rank 0) before the others start.
    """
    node = OmegaConf.to_container(cfg.data, resolve=True)
    prepare = node.pop("prepare_command", None)  # ours, not a DataModule argument
    log.info("instantiating datamodule <%s>", node.get("_target_"))
    dm = hydra.utils.instantiate(node, _convert_="all")
    splits = [dm.train_split] if cfg.get("train", True) else []
    splits += [getattr(dm, "val_split", None)] if cfg.get("train", True) else []
    splits += [getattr(dm, "test_split", None)] if cfg.get("test", False) else []
    try:
        if hasattr(dm, "prepare_data"):
            dm.prepare_data()
        check_prepared(dm, [s for s in splits if s])
    except FileNotFoundError as e:
        msg = f"the dataset is not prepared: {e}"
        if prepare:
            msg += f"\nPrepare it with:\n  {prepare}"
        raise MissingDataError(msg) from None
    return dm


def check_prepared(dm: Any, splits: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the first missing manifest, shard or tokenizer of ``dm``."""
    from ..data.shards import read_manifest, split_dir

    datasets = [getattr(dm, a) for a in ("caption_dataset", "vqa_dataset") if hasattr(dm, a)]
    datasets = datasets or [dm.dataset]
    for ds in datasets:
        for split in splits:
            read_manifest(split_dir(dm.data_dir, ds, split))
    _ = dm.tokenizer  # loads <data_dir>/<dataset>/tokenizer.json (FileNotFoundError if absent)


# ---------------------------------------------------------------------- printing
def print_config_tree(
    cfg: DictConfig,
    order: Sequence[str] = (
        "data",
        "model",
        "module",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "experiment",
    ),
    resolve: bool = True,
    save_to: str | Path | None = None,
    echo: bool = True,
) -> None:
    """Print the resolved config as a rich tree (``echo``) and write it to ``save_to`` / the run dir."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=resolve) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    if echo:
        rich.print(tree)
    out = save_to
    if out is None:
        try:
            out = Path(cfg.paths.output_dir) / "config_tree.log"
        except Exception:  # output_dir unresolvable outside a Hydra run
            out = None
    if out is not None:
        from ..evaluation.formats import write_atomic

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                rich.print(tree, file=f)

        write_atomic(out, write)


def is_finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
