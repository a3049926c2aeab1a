"""SIGINT / SIGTERM during training: finish the current batch, save `last.ckpt`, stop with a one-line message.

A cluster scheduler (SLURM, Kubernetes) sends SIGTERM before it kills a job, and Ctrl+C sends SIGINT. Without
this callback both lose everything since the last validation. With it, the signal only sets a flag; at the end
of the batch being trained every rank agrees to stop (one boolean all-reduce per batch under DDP, nothing on a
single device), `trainer.save_checkpoint` writes `last.ckpt` (atomically, rank 0 writes, all ranks take part as
Lightning requires), and a `UserError` ends the run: the CLI prints

    dinov3ds: error: training interrupted by SIGTERM at epoch 1, step 7; saved .../last.ckpt; continue with `dinov3ds train --resume` and the same config

and exits with code 2. A second signal while waiting for the batch to end stops at once (SIGINT raises
KeyboardInterrupt, SIGTERM takes its default action); the previous `last.ckpt` is then still intact.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback

from dinov3ds.errors import UserError

logger = logging.getLogger("dinov3ds")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt(Callback):
    """Turn SIGINT/SIGTERM into "save last.ckpt at the next batch end, then stop"."""

    def __init__(self, last_checkpoint: str | Path) -> None:
        self.last_checkpoint = Path(last_checkpoint)
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, Any] = {}

    # -- handlers -------------------------------------------------------------------------------------------

    def _install(self) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; a notebook thread keeps the defaults
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # asked twice: stop now, like the default would
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning(
            "%s received: saving %s after this batch (send it again to stop at once)",
            name,
            self.last_checkpoint,
        )

    # -- Lightning hooks ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        # Every rank must call save_checkpoint (it synchronises), so all agree first: any rank's signal counts.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        trainer.save_checkpoint(self.last_checkpoint, weights_only=False)  # full state, so --resume is exact
        self._restore()
        raise UserError(
            f"training interrupted by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; saved "
            f"{self.last_checkpoint}; continue with `dinov3ds train --resume` and the same config"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
