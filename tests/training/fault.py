"""Fault injection for resume tests: ``+callbacks.fault._target_=tests.training.fault.KillAtStep``.

A killed run is the case exact resume exists for: no teardown, no final checkpoint, logs cut where
they were. Every rank kills itself at the same step (a rank left alone would wait in its next
collective until the process-group timeout).
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process once ``trainer.global_step`` reaches ``step`` (before ModelCheckpoint,
    which Lightning runs last, saves anything at that step)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
