"""Lightning's checkpoint writer for training runs, atomic (models.checkpoints writes and reads the files):
kept out of `models` so that inference never imports Lightning (and, through it, torchmetrics: ~3 s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import atomic_torch_save, load_checkpoint_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic, and with disk errors reported as user errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        try:
            atomic_torch_save(checkpoint, Path(path))
        except OSError as error:
            raise UserError(
                f"cannot write checkpoint {path}: {error.strerror or error}; free disk space or choose a "
                "writable output_dir (the previous checkpoint is intact)"
            ) from None

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint_file(Path(path))
