"""Where a variant's weight bytes are: the path or Hub id given, else Meta's file in checkpoints/, else the
variant's timm or transformers repo if it is already in the Hugging Face cache.

A local file is checked before it is opened: a regular file (a FIFO would block forever), and the SHA-256
prefix in Meta's file names (cached).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dinov3ds.errors import UserError
from dinov3ds.models.variants import BackboneSpec
from dinov3ds.models.weights.files import require_regular_file
from dinov3ds.models.weights.hashes import verify_hash
from dinov3ds.models.weights.hub import PREFIX, cached_snapshot, is_hub_id, resolve

logger = logging.getLogger("dinov3ds")


@dataclass(frozen=True)
class WeightSource:
    path: Path  # a weight file or a model folder on this machine
    label: str  # what a checkpoint records to find it again: a file or folder name, or the hf-hub: id


def checkpoint_dirs() -> list[Path]:
    """Folders searched for official weight files: $DINOV3DS_CHECKPOINTS first, then ./checkpoints."""
    dirs = [Path(p) for p in os.environ.get("DINOV3DS_CHECKPOINTS", "").split(os.pathsep) if p]
    return [*dirs, Path("checkpoints")]


def find_weight_file(spec: BackboneSpec) -> Path | None:
    """The official weight file for `spec` if it lies in one of `checkpoint_dirs()`."""
    for folder in checkpoint_dirs():
        candidate = folder / spec.weight_file
        if candidate.is_file():
            return candidate
    return None


def find_source(spec: BackboneSpec, weights: str | Path | None) -> WeightSource:
    """Where the weights for `spec` are: the given path or Hub id, else the default places in order."""
    source = _locate(spec, weights)
    if not source.path.is_dir():
        require_regular_file(source.path)
        verify_hash(source.path)  # Meta's names carry a SHA-256 prefix; checked (and cached) first
    return source


def _locate(spec: BackboneSpec, weights: str | Path | None) -> WeightSource:
    if is_hub_id(weights):
        return WeightSource(resolve(str(weights)), str(weights))
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise UserError(f"weight file {path} not found; check the path (official name: {spec.weight_file})")
        return WeightSource(path, path.name)
    official = find_weight_file(spec)
    if official is not None:
        return WeightSource(official, official.name)
    for repo in (spec.timm_hub_id, spec.transformers_hub_id):
        cached = cached_snapshot(repo) if repo else None
        if cached is not None:
            logger.info("%s: Meta's file is not in checkpoints/, using hf-hub:%s from the Hugging Face cache", spec.name, repo)
            return WeightSource(cached, f"{PREFIX}{repo}")
    places = " or ".join(str(d / spec.weight_file) for d in checkpoint_dirs())
    timm_hint = f"backbone.weights=hf-hub:{spec.timm_hub_id} (timm, no access form), " if spec.timm_hub_id else ""
    raise UserError(
        f"no weights for {spec.name}: put Meta's file at {places} (request it at {spec.url}), or set "
        f"{timm_hint}backbone.weights=hf-hub:{spec.transformers_hub_id} (transformers), or a local file or "
        "folder; weights: random for a smoke test"
    )


def sources_found(spec: BackboneSpec) -> list[str]:
    """Which of the variant's official sources are on this machine (no network): meta, timm, transformers."""
    found = ["meta"] if find_weight_file(spec) else []
    found += ["timm"] if spec.timm_hub_id and cached_snapshot(spec.timm_hub_id) else []
    return found + (["transformers"] if cached_snapshot(spec.transformers_hub_id) else [])
