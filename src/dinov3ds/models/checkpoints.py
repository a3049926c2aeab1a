"""Head-only checkpoints: what they hold, atomic writes, safe reads, and finding the backbone again.

A checkpoint holds the head's weights, the resolved config, the class names and the backbone's identity
(variant, weight-file name and SHA-256), never the frozen backbone itself: a ViT-7B head is megabytes.
Lightning's own training state (optimizer, scheduler, loops) rides along so `--resume` is exact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinov3ds.errors import UserError
from dinov3ds.models import eomt_transformers
from dinov3ds.models.weights import hub
from dinov3ds.models.weights.files import pickle_refusal_reason
from dinov3ds.models.weights.hashes import weights_digest
from dinov3ds.models.weights.sources import checkpoint_dirs

FORMAT_VERSION = 1
HEAD_PREFIX = "model.head."
BACKBONE_PREFIX = "model.backbone."


@dataclass(frozen=True)
class HeadCheckpoint:
    task: str
    config: dict  # what rebuilds the head in this file
    run_config: dict  # the training run's own (a probe grid's, where `config` is its winner's); --resume compares it
    class_names: list[str]
    num_classes: int
    backbone: dict
    head_state_dict: dict[str, torch.Tensor]
    backbone_state_dict: dict[str, torch.Tensor]  # only the blocks that were unfrozen and fine-tuned
    format_version: int


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint_file(path: Path) -> dict:
    """`torch.load(weights_only=True)`: a checkpoint that carries code is refused, not executed."""
    if eomt_transformers.folder_of(path) is not None:  # transformers' EoMT folder, read as a checkpoint
        return eomt_transformers.checkpoint_dict(path)
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; check the path (runs write output_dir/checkpoints/)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"refused to load {path}: it contains Python objects that could run code "
            f"({pickle_refusal_reason(error)}); only load checkpoints written by dinov3ds"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
        raise UserError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({str(error)[:120]})") from None


def read_checkpoint(path: str | Path, expected_task: str | None = None) -> HeadCheckpoint:
    """Read and check a dinov3ds checkpoint (format version, task)."""
    raw = load_checkpoint_file(Path(path))
    meta = raw.get("dinov3ds") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a dinov3ds checkpoint (no 'dinov3ds' section); use a file from output_dir/checkpoints/")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        raise UserError(f"{path} has a format_version that is not a number; use a checkpoint as training wrote it") from None
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}, newer than this dinov3ds understands ({FORMAT_VERSION}); "
            "upgrade dinov3ds"
        )
    if expected_task and meta.get("task") != expected_task:
        raise UserError(f"{path} is a {meta.get('task')} checkpoint, not {expected_task}; use the matching command or class")
    state = raw.get("state_dict")
    try:
        if not isinstance(state, dict) or not isinstance(meta["config"], dict):
            raise TypeError("no state_dict" if not isinstance(state, dict) else "config is not a mapping")
        return HeadCheckpoint(
            task=meta["task"],
            config=meta["config"],
            run_config=meta.get("run_config", meta["config"]),
            class_names=[str(name) for name in meta["class_names"]],
            num_classes=int(meta["num_classes"]),
            backbone=dict(meta["backbone"]),
            head_state_dict={k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)},
            backbone_state_dict={k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)},
            format_version=version,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{path} is an incomplete dinov3ds checkpoint ({type(error).__name__}: {error}); use a checkpoint as "
            "training wrote it"
        ) from None


def resolve_backbone_weights(checkpoint: HeadCheckpoint, checkpoint_path: str | Path, recorded: str | None) -> str:
    """Find the weights the head was trained on and refuse different ones (their SHA-256 must match).

    `recorded` (the config's backbone.weights, possibly overridden) is tried first; then a Hub id from the
    Hugging Face cache (or the Hub), or a file or folder of that name in checkpoints/.
    """
    identity = checkpoint.backbone
    label = identity["weights"]
    if label == "random":
        return "random"
    candidates = [recorded] if recorded and recorded != "random" else []
    candidates += [label] if hub.is_hub_id(label) else [str(folder / label) for folder in checkpoint_dirs()]
    for candidate in candidates:
        path = hub.resolve(candidate) if hub.is_hub_id(candidate) else Path(candidate)
        if path.exists():
            found = weights_digest(path)
            if found != identity["sha256"]:
                raise UserError(
                    f"{checkpoint_path} was trained on backbone weights {label} (sha256 {identity['sha256'][:12]}…) "
                    f"but {candidate} has sha256 {found[:12]}…; put the original weights there"
                )
            return candidate
    raise UserError(
        f"{checkpoint_path} needs backbone weights {label}; put that file in checkpoints/ (or set "
        "DINOV3DS_CHECKPOINTS), or set backbone.weights=<its path>"
    )
