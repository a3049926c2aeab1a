"""Weight files: safe loading, SHA-256 verification with a cache, and a description of what a file holds.

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

from dinov3ds.errors import UserError

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8})\.pth$")


@dataclass(frozen=True)
class WeightFile:
    path: Path
    sha256: str


def cache_dir() -> Path:
    """Where dinov3ds keeps small caches ($DINOV3DS_CACHE, else ~/.cache/dinov3ds)."""
    return Path(os.environ.get("DINOV3DS_CACHE", Path.home() / ".cache" / "dinov3ds"))


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
        raise UserError(f"{path} is not a state dict of tensors; use Meta's official .pth weight file")
    return state


def inspect_state_dict(state_dict: dict[str, Tensor]) -> dict:
    """Describe a DINOv3 state dict (family, width, depth) so a wrong file gets a useful message."""
    if "cls_token" in state_dict and "storage_tokens" in state_dict:
        embed_dim = state_dict["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        ffn = "SwiGLU" if any(".mlp.w1." in k for k in state_dict) else "MLP"
        return {
            "family": "vit",
            "embed_dim": embed_dim,
            "depth": depth,
            "summary": f"a DINOv3 ViT of width {embed_dim}, depth {depth}, {ffn} FFN",
        }
    if "downsample_layers.0.0.weight" in state_dict:
        dims = [state_dict[f"downsample_layers.{i}.1.weight"].shape[0] for i in range(1, 4)]
        embed_dim = dims[-1]
        return {"family": "convnext", "embed_dim": embed_dim, "summary": f"a DINOv3 ConvNeXt with last width {embed_dim}"}
    return {"family": None, "summary": "no DINOv3 backbone weights"}
