"""The identity of weight bytes: SHA-256 of a file (cached), the hash prefix in Meta's file names, a folder's digest.

Meta's file names end in the first 8 hex digits of the file's SHA-256 (the torch.hub convention). Hashing a
13 GB 7B file takes a minute, so the result is cached by (path, size, mtime) and the hash is done once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dinov3ds.config import cache_dir
from dinov3ds.errors import UserError
from dinov3ds.models.weights.files import weight_files

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


def weights_digest(path: Path) -> str:
    """SHA-256 of a weight file; of a folder's single file; of the shard hashes for a sharded folder."""
    files = weight_files(path)
    if len(files) == 1:
        return sha256_of(files[0])
    return hashlib.sha256("".join(sha256_of(file) for file in files).encode()).hexdigest()
