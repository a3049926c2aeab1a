"""Weights on the Hugging Face Hub (`hf-hub:<repo id>`): from the local cache when offline, else downloaded.

timm's repos (`timm/vit_small_patch16_dinov3_qkvb.lvd1689m`, no access form) and Meta's transformers repos
(`facebook/dinov3-vits16-pretrain-lvd1689m`, gated) hold a `config.json` and safetensors; both resolve to
the snapshot folder, and the loader tells the two apart by their keys. `huggingface_hub` (installed with
timm) owns the cache layout, resumable downloads and the progress bar.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinov3ds.errors import UserError

PREFIX = "hf-hub:"
PATTERNS = ["*.json", "*.safetensors"]


def is_hub_id(weights: object) -> bool:
    return isinstance(weights, str) and weights.startswith(PREFIX)


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (it reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """The Hub cache folder as huggingface_hub defines it (HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The repo's snapshot folder if its weights are already in the local cache; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True, cache_dir=cache_root()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if any(folder.glob("*.safetensors")) else None


def resolve(weights: str) -> Path:
    """The local snapshot folder for `hf-hub:<repo id>`: the cache offline, a (resumable) download online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id = weights.removeprefix(PREFIX)
    if not repo_id or repo_id.count("/") != 1:
        raise UserError(f"{weights!r} is not a Hub id; write hf-hub:<owner>/<name>, e.g. hf-hub:timm/vit_small_patch16_dinov3_qkvb.lvd1689m")
    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    root = cache_root()
    if _offline():
        raise UserError(
            f"{repo_id} is not in the Hugging Face cache ({root}) and HF_HUB_OFFLINE is set: on a machine with "
            f"network run `hf download {repo_id}` and copy its models--{repo_id.replace('/', '--')} folder into {root}"
        )
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=PATTERNS, cache_dir=root))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, then log in with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hugging Face Hub (or is private); check the id") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot reach the Hugging Face Hub for {repo_id} and it is not in the cache ({root}): on a machine "
            f"with network run `hf download {repo_id}` and copy its models--{repo_id.replace('/', '--')} folder "
            f"into {root}"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise UserError(f"downloading {repo_id} failed ({str(error).splitlines()[0][:160]}); try again") from None
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{repo_id} has no safetensors weights; use a timm or transformers DINOv3 repo")
    return folder
