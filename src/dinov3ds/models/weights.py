"""Weight files: reading them safely (Meta's .pth, safetensors, transformers folders), and their SHA-256.

Meta's file names end in the first 8 hex digits of the file's SHA-256 (the torch.hub convention). Hashing a
13 GB 7B file takes a minute, so the result is cached by (path, size, mtime) and the hash is done once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dinov3ds.config import cache_dir
from dinov3ds.errors import UserError

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8})\.pth$")


@dataclass(frozen=True)
class WeightFile:
    path: Path
    sha256: str


def _hash_cache_file() -> Path:
    return cache_dir() / "sha256.json"


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, cached by resolved path, size and modification time."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=0))
        os.replace(temporary, cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return cache[key]


def verify_hash(path: Path) -> WeightFile:
    """Check the hash prefix in the file name, if there is one, against the file's SHA-256."""
    sha256 = sha256_of(path)
    match = HASH_IN_NAME.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise UserError(
            f"{path} is corrupt or not the official file: its name says SHA-256 {match.group(1)}…, "
            f"the file has {sha256[:8]}…; download it again"
        )
    return WeightFile(path, sha256)


def pickle_refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names the offending global, not its advice to disable the check."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or ["not a tensor-only file"])[0][:160]


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a `.pth` file (Meta's, or a training checkpoint's `teacher`), a `.safetensors` file
    or a transformers / timm model folder, memory-mapped; a pickle is refused, never run."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_pth(path)


def weight_files(path: Path) -> list[Path]:
    """The file(s) holding the tensors: the path itself, or a folder's safetensors shards (or .bin)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{index} is not a safetensors index ({error}); download the folder again") from None
        return [path / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise UserError(
        f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; point "
        "backbone.weights at a transformers or timm model folder, or at a weight file"
    )


def weights_digest(path: Path) -> str:
    """SHA-256 of a weight file; of a folder's single file; of the shard hashes for a sharded folder."""
    files = weight_files(path)
    if len(files) == 1:
        return sha256_of(files[0])
    return hashlib.sha256("".join(sha256_of(file) for file in files).encode()).hexdigest()


def _load_folder(path: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise UserError(f"{file} is missing (named in {path}'s index); download the folder again")
        state.update(_load_safetensors(file) if file.suffix == ".safetensors" else _load_pth(file))
    return state


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)  # memory-mapped: tensors are read as they are used
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"cannot read {path}: truncated or not a safetensors file ({str(error).splitlines()[0][:160]}); "
            "download it again"
        ) from None


def _load_pth(path: Path) -> dict[str, Tensor]:
    """Load a plain state dict with `weights_only=True` (no code runs) and `mmap=True` (no extra copy)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"refused to load {path}: it contains Python objects, not only tensors ({pickle_refusal_reason(error)}); "
            "use the official weight file"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise UserError(
            f"cannot read {path}: the file is truncated or not a PyTorch checkpoint ({str(error).splitlines()[0]}); "
            "download it again"
        ) from None
    if isinstance(state, dict) and "teacher" in state and isinstance(state["teacher"], dict):
        state = {k.removeprefix("backbone."): v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; use an official weight file (Meta, timm or transformers)")
    return state
