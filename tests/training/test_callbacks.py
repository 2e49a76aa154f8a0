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
