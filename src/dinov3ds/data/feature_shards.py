"""Features stored as a folder of fixed-size shards: written by any number of processes, resumable, read back
memory-mapped.

    <folder>/settings.json           what the features are of (written first; a resume must match it)
    <folder>/shard-00000.safetensors rows [0, S), tensors + the image paths in the metadata
    <folder>/shard-00001.safetensors rows [S, 2S) ...
    <folder>/index.json              written last, once every shard is there: rows, shards, arrays

Shard i holds rows [i·S, (i+1)·S) whoever wrote it, so N processes split the shards (i mod N) with no
coordination, and a killed run restarts by writing only the shards that are missing. Each shard is written
to a temporary name and renamed, so a shard file either is complete or does not exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dinov3ds.errors import UserError

FORMAT = "dinov3ds-feature-shards/1"


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def shard_count(rows: int, shard_size: int) -> int:
    return max(1, -(-rows // shard_size))


def claim_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    """Start or resume the folder for these settings. A folder holding features of other settings (another
    backbone, size, image list) is refused unless `overwrite`, which removes its shards first."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    wanted = {"format": FORMAT, **settings}
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = None
        if found != wanted and not overwrite:
            raise UserError(
                f"{folder} holds features of other settings (or of other images); pass --overwrite to replace "
                "them, or choose another --out"
            )
        if found != wanted or overwrite:
            for stale in [*folder.glob("shard-*.safetensors"), folder / "index.json"]:
                stale.unlink(missing_ok=True)
    elif not overwrite and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty and holds no dinov3ds features; choose an empty or new --out")
    for leftover in folder.glob("shard-*.safetensors.*.tmp"):  # a killed run's half-written shard
        leftover.unlink(missing_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(wanted, indent=2))
    os.replace(temporary, path)


def shard_is_complete(path: Path, rows: int) -> bool:
    """Whether `path` is a readable shard of `rows` rows (a truncated or foreign file is not)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            paths = json.loads(handle.metadata().get("paths", "[]"))
            return len(paths) == rows and all(handle.get_slice(k).get_shape()[0] == rows for k in handle.keys())
    except (SafetensorError, OSError, ValueError, AttributeError):
        return False


def write_shard(path: Path, tensors: dict[str, torch.Tensor], image_paths: Sequence[str]) -> None:
    from safetensors.torch import save_file

    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary),
              metadata={"paths": json.dumps([str(p) for p in image_paths])})  # fmt: skip
    os.replace(temporary, path)


def write_index(folder: Path, rows: int, shard_size: int) -> dict:
    """The index, once every shard is complete: rows, shard files and each array's per-row shape and dtype."""
    shards = [shard_path(folder, i) for i in range(shard_count(rows, shard_size))]
    sizes = [min(shard_size, rows - i * shard_size) for i in range(len(shards))]
    missing = [p.name for p, n in zip(shards, sizes) if not shard_is_complete(p, n)]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} shard(s) (first {missing[0]}); run the same command again to finish")
    from safetensors import safe_open

    with safe_open(str(shards[0]), framework="pt") as handle:
        arrays = {k: {"shape": handle.get_slice(k).get_shape()[1:], "dtype": handle.get_slice(k).get_dtype()}
                  for k in handle.keys()}  # fmt: skip
    index = {"format": FORMAT, "rows": rows, "shard_size": shard_size, "shards": [p.name for p in shards], "arrays": arrays}
    temporary = folder / f"index.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(index, indent=2))
    os.replace(temporary, folder / "index.json")
    return index


def read_features(folder: str | Path) -> dict[str, np.ndarray]:
    """Every array of a finished folder, rows in image order, plus `paths`."""
    from safetensors import safe_open

    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} has no index.json: the extraction did not finish; run it again to complete it")
    index = json.loads(index_path.read_text())
    parts: dict[str, list[np.ndarray]] = {name: [] for name in index["arrays"]}
    paths: list[str] = []
    for name in index["shards"]:
        with safe_open(str(folder / name), framework="np") as handle:
            paths += json.loads(handle.metadata()["paths"])
            for key in parts:
                parts[key].append(handle.get_tensor(key))
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    arrays["paths"] = np.array(paths)
    return arrays
