"""Features stored as a folder of fixed-size shards: written by any number of processes, resumable, each shard
checked against its recorded size and SHA-256 before a byte of it is read.

    <folder>/settings.json           what the features are of (written first; a resume must match it)
    <folder>/shard-00000.safetensors rows [0, S), tensors + the image paths in the metadata
    <folder>/shard-00001.safetensors rows [S, 2S) ...
    <folder>/index.json              written last, once every shard is there: rows, shards (name, bytes,
                                     SHA-256), arrays

Shard i holds rows [i·S, (i+1)·S) whoever wrote it, so N processes split the shards (i mod N) with no
coordination, and a killed run restarts by writing only the shards that are missing. Every file is written to
a temporary name and renamed (a full disk leaves no half file under a real name), and index.json, renamed into
place last, is what publishes the folder. A reader takes from the index only the shard names the rows and
shard size give (plain names inside the folder, each once) and checks each file's size and hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dinov3ds.errors import UserError

FORMAT = "dinov3ds-feature-shards/1"
LOCK_NAME = ".dinov3ds.lock"  # the writer's lock (training.run_folder.folder_lock), neither features nor the user's


class ShardFault(ValueError):
    """What is wrong with a finished folder's index or shards, in one line (the folder is then rebuilt)."""


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def shard_count(rows: int, shard_size: int) -> int:
    return max(1, -(-rows // shard_size))


def publish(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path` (never through a link), then rename it into place; on
    any error (a full disk) the temporary file is removed and the OSError raised."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _digest(path: Path) -> dict:
    """The file's size and SHA-256, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _drop_shards_off_their_record(folder: Path) -> None:
    """A finished folder claimed again (its check failed, or the command is run again): keep only the shards
    that still match index.json's record of them, so exactly the lost or altered ones are written again."""
    index = folder / "index.json"
    if not index.exists():
        return  # unfinished: resume from the complete shards
    try:
        records = {entry["name"]: entry for entry in json.loads(index.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        records = {}
    for path in folder.glob("shard-*.safetensors"):
        record = records.get(path.name)
        if path.is_symlink() or record is None or _digest(path) != {k: record.get(k) for k in ("bytes", "sha256")}:
            path.unlink()
    index.unlink()


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
    elif not overwrite and any(entry.name != LOCK_NAME for entry in folder.iterdir()):
        raise UserError(f"{folder} is not empty and holds no dinov3ds features; choose an empty or new --out")
    _drop_shards_off_their_record(folder)
    for pattern in ("shard-*.safetensors.*.tmp", "index.json.*.tmp", "settings.json.*.tmp"):
        for leftover in folder.glob(pattern):  # a killed run's half-written file
            leftover.unlink(missing_ok=True)
    publish(path, json.dumps(wanted, indent=2).encode())


def shard_is_complete(path: Path, image_paths: Sequence[str | Path]) -> bool:
    """Whether `path` is a readable shard of exactly these images' rows (a truncated, foreign or copied file is not)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            paths = json.loads(handle.metadata().get("paths", "[]"))
            rows = len(image_paths)
            return paths == [str(p) for p in image_paths] and all(handle.get_slice(k).get_shape()[0] == rows for k in handle.keys())
    except (SafetensorError, OSError, ValueError, AttributeError):
        return False


def write_shard(path: Path, tensors: dict[str, torch.Tensor], image_paths: Sequence[str | Path]) -> None:
    """One shard, whole or not at all (serialised in memory, so a full disk is an OSError, not half a file)."""
    from safetensors.torch import save

    publish(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"paths": json.dumps([str(p) for p in image_paths])}))


def write_index(folder: Path, image_paths: Sequence[str | Path], shard_size: int) -> dict:
    """The index, once every shard holds its images' rows: rows, each shard's name, size and SHA-256, and each
    array's per-row shape and dtype."""
    rows = len(image_paths)
    shards = [shard_path(folder, i) for i in range(shard_count(rows, shard_size))]
    missing = [p.name for i, p in enumerate(shards) if not shard_is_complete(p, image_paths[i * shard_size : (i + 1) * shard_size])]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} shard(s) (first {missing[0]}); run the same command again to finish")
    from safetensors import safe_open

    with safe_open(str(shards[0]), framework="pt") as handle:
        arrays = {k: {"shape": handle.get_slice(k).get_shape()[1:], "dtype": handle.get_slice(k).get_dtype()}
                  for k in handle.keys()}  # fmt: skip
    records = [{"name": p.name, **_digest(p)} for p in shards]
    index = {"format": FORMAT, "rows": rows, "shard_size": shard_size, "shards": records, "arrays": arrays}
    publish(folder / "index.json", json.dumps(index, indent=2).encode())
    return index


def _listing_fault(names: list, expected: list[str]) -> str:
    odd = next((n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")), None)
    if odd is not None:
        return f"index.json names shard {odd!r}, not a plain name inside the folder"
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        return f"index.json lists {twice} twice"
    return f"index.json lists {len(names)} shard(s), not the {len(expected)} its rows and shard size give"


def checked_shards(folder: Path, index: dict, rows: int, shard_size: int) -> list[Path]:
    """The shard files of a finished folder whose settings say `rows` rows in shards of `shard_size`: the index
    must list exactly the names those give, each a plain file of its recorded size and SHA-256 (ShardFault)."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardFault("index.json is not a dinov3ds shard index")
    if (index.get("rows"), index.get("shard_size")) != (rows, shard_size):
        raise ShardFault(f"index.json says {index.get('rows')} rows in shards of {index.get('shard_size')}, "
                         f"settings.json {rows} in shards of {shard_size}")  # fmt: skip
    records = index.get("shards")
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"name", "bytes", "sha256"} <= r.keys() for r in records):
        raise ShardFault("index.json records no size and SHA-256 per shard")
    names, expected = [r["name"] for r in records], [shard_path(folder, i).name for i in range(shard_count(rows, shard_size))]
    if names != expected:
        raise ShardFault(_listing_fault(names, expected))
    for record in records:
        path = folder / record["name"]
        if path.is_symlink() or not path.is_file():
            raise ShardFault(f"{path.name} is missing (or not a plain file)")
        if _digest(path) != {"bytes": record["bytes"], "sha256": record["sha256"]}:
            raise ShardFault(f"{path.name} is not the file index.json recorded (size or SHA-256 differ)")
    return [folder / name for name in names]


def read_features(folder: str | Path) -> dict[str, np.ndarray]:
    """Every array of a finished folder, rows in image order, plus `paths`."""
    from safetensors import safe_open

    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} has no index.json: the extraction did not finish; run it again to complete it")
    try:
        index, settings = (json.loads((folder / name).read_text()) for name in ("index.json", "settings.json"))
        shards = checked_shards(folder, index, len(settings["paths"]), settings["shard_size"])
    except (OSError, ValueError, KeyError, TypeError) as fault:
        reason = fault if isinstance(fault, ShardFault) else f"index.json or settings.json is unreadable ({type(fault).__name__})"
        raise UserError(f"{folder}: {reason}; run the same dinov3ds features command again to rebuild it") from None
    parts: dict[str, list[np.ndarray]] = {name: [] for name in index["arrays"]}
    paths: list[str] = []
    for shard in shards:
        with safe_open(str(shard), framework="np") as handle:
            paths += json.loads(handle.metadata()["paths"])
            for key in parts:
                parts[key].append(handle.get_tensor(key))
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    arrays["paths"] = np.array(paths)
    return arrays
