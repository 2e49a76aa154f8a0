"""The demo's progress bar (steps against max_steps, none when the trainer runs without one) and
the console filters."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

from vlm_mamba.training.callbacks import StepProgressBar, silence_known_noise
from vlm_mamba.training.run import instantiate_list

CONF = Path(__file__).resolve().parents[2] / "conf"


def _callbacks(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", f"paths.output_dir={tmp_path}", *overrides])
    return instantiate_list(cfg.callbacks, "callbacks")


def test_demo_bar_counts_steps_against_max_steps(tmp_path):
    bars = [c for c in _callbacks([], tmp_path) if isinstance(c, StepProgressBar)]
    assert len(bars) == 1 and bars[0].refresh_rate == 4
    trainer = L.Trainer(max_steps=40, max_epochs=-1, callbacks=bars, logger=False)
    bars[0].setup(trainer, L.LightningModule(), "fit")  # what fit does first: attaches the trainer
    assert bars[0].total_train_batches == 40
    assert bars[0]._get_train_description(6).strip() == "Training"  # not "Epoch 6/-2"
    assert trainer.progress_bar_callback is bars[0]


def test_demo_without_a_progress_bar_builds_no_bar(tmp_path):
    cbs = _callbacks(["+trainer.enable_progress_bar=false"], tmp_path)
    assert not any(isinstance(c, StepProgressBar) for c in cbs)
    L.Trainer(max_steps=2, callbacks=cbs, logger=False, enable_progress_bar=False)  # accepted


def test_known_noise_is_filtered():
    silence_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_lightning_accelerator_lines_filtered_but_gpu_line_kept():
    import logging

    silence_known_noise()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for msg in (
            "GPU available: False, used: False",
            "TPU available: False, using: 0 TPU cores",
            "HPU available: False, using: 0 HPUs",
            "TPU available: True, using: 8 TPU cores",
        ):
            logger.info(msg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["GPU available: False, used: False", "TPU available: True, using: 8 TPU cores"]


def _summary_text(module, flops):
    from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary as Summary
    from rich import get_console

    from vlm_mamba.training.callbacks import ModelSummary

    summary = Summary(module, max_depth=1)
    with get_console().capture() as cap:
        ModelSummary.summarize(
            summary._get_summary_data(),
            summary.total_parameters,
            summary.trainable_parameters,
            summary.model_size,
            summary.total_training_modes,
            flops,
        )
    return cap.get()


def test_model_summary_drops_flops_only_when_none_were_counted(tmp_path):
    import torch

    from vlm_mamba.training.callbacks import ModelSummary

    assert any(isinstance(c, ModelSummary) for c in _callbacks([], tmp_path))

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 32)

    text = _summary_text(Net(), 0)
    assert "proj" in text and "Linear" in text and "544" in text  # 16 * 32 + 32 parameters
    assert "Total params" in text and "Modules in train mode" in text
    assert "FLOPs" not in text
    counted = _summary_text(Net(), 12_000)
    assert "FLOPs" in counted and "Total FLOPs" in counted and "12.0 K" in counted


def test_console_logs_print_above_the_live_bar_and_streams_are_restored(tmp_path):
    # a log line written while the bar is live went straight to the terminal and was glued onto the
    # bar's line; while the bar runs, the console handler writes through Rich's proxy (which prints
    # above the bar), and gets its own stream back when the bar stops
    import io
    import logging
    import sys

    import rich
    import torch

    original = sys.stdout
    handler = logging.StreamHandler(original)
    logger = logging.getLogger("lightning.pytorch")  # a logger the bar reroutes (one of Lightning's)
    logger.addHandler(handler)
    seen = []

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen.append(handler.stream)
            return self.w(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)

    screen = io.StringIO()
    bar = StepProgressBar(console_kwargs={"force_terminal": True, "file": screen, "width": 100})
    try:
        L.Trainer(
            max_steps=3,
            callbacks=[bar],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        ).fit(Net())
    finally:
        logger.removeHandler(handler)
        rich.reconfigure()
    assert len(seen) == 3
    assert all(s is not original for s in seen)  # Rich's proxy while the bar was live
    assert handler.stream is original and sys.stdout is original
    assert "3/3" in screen.getvalue()
