"""Small random checkpoints in Meta's official DINOv3 format, written without Meta's code.

Tests of the loader, the CLI and training need a real-looking `.pth`: Meta's key names, the k-bias mask, the
RoPE periods buffer and a file name whose 8 hex characters are the file's SHA-256 prefix. We build the timm
model, give it non-trivial weights, and invert timm's key conversion (`timm.models.eva.checkpoint_filter_fn`,
`timm.models.convnext.checkpoint_filter_fn`). The key lists match the shared reference fixtures exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dinov3ds.models.backbones import Backbone, load_backbone
from dinov3ds.models.variants import BackboneSpec, get_spec

ROPE_BASE = 100.0
# Variants whose official checkpoints carry an extra, eval-unused `local_cls_norm` (README: untie_global_and_local_cls_norm).
UNTIED_CLS_NORM = {"vitl16_sat493m", "vit7b16", "vit7b16_sat493m"}


def source_backbone(name: str, *, depth: int = 1, seed: int = 0, **overrides) -> Backbone:
    """The random backbone a checkpoint is written from, with weights perturbed like the reference fixtures.

    timm's init leaves q/v biases at 0 and layer-scale at 1e-5, which would hide mapping bugs (a dropped bias,
    swapped ls1/ls2). The fixtures' recipe makes every tensor matter; it is deterministic in `seed`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(name, "random", depth=depth, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in backbone.model.named_parameters():
            tensor.copy_(_noise(key, tensor, generator))
    return backbone


def _noise(key: str, tensor: Tensor, generator: torch.Generator) -> Tensor:
    """The fixture README's perturbation recipe, chosen by timm's parameter name."""
    shape = tensor.shape
    if key.endswith(("gamma", "gamma_1", "gamma_2")):
        return torch.empty(shape).uniform_(0.1, 1.0, generator=generator)
    if key.endswith(("cls_token", "reg_token", "q_bias", "v_bias")):
        return 0.5 * torch.randn(shape, generator=generator)
    if tensor.ndim >= 2:
        return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):  # 1-D weights are norms
        return 1 + 0.3 * torch.randn(shape, generator=generator)
    return 0.2 * torch.randn(shape, generator=generator)


def timm_to_official(
    state: dict[str, Tensor], spec: BackboneSpec, num_heads: int | None = None
) -> dict[str, Tensor]:
    """timm's state dict → Meta's key names, shapes and extra buffers, in Meta's key order."""
    if spec.family == "convnext":
        return _convnext_to_official(state)
    return _vit_to_official(state, spec, num_heads)


def _vit_to_official(
    state: dict[str, Tensor], spec: BackboneSpec, num_heads: int | None
) -> dict[str, Tensor]:
    embed_dim = state["cls_token"].shape[-1]
    head_dim = embed_dim // num_heads
    out = {
        "cls_token": state["cls_token"],
        "storage_tokens": state["reg_token"],
        "mask_token": torch.zeros(1, embed_dim, dtype=state["cls_token"].dtype),
        "patch_embed.proj.weight": state["patch_embed.proj.weight"],
        "patch_embed.proj.bias": state["patch_embed.proj.bias"],
        # Meta's buffer: base^(2i / (D_head/2)) for i < D_head/4; timm recomputes it and ignores this copy.
        "rope_embed.periods": ROPE_BASE
        ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)),
    }
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        timm = meta = f"blocks.{i}."
        out[meta + "norm1.weight"] = state[timm + "norm1.weight"]
        out[meta + "norm1.bias"] = state[timm + "norm1.bias"]
        out[meta + "attn.qkv.weight"] = state[timm + "attn.qkv.weight"]
        if timm + "attn.q_bias" in state:
            q_bias, v_bias = state[timm + "attn.q_bias"], state[timm + "attn.v_bias"]
            out[meta + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            ones = torch.ones_like(q_bias)
            out[meta + "attn.qkv.bias_mask"] = torch.cat([ones, torch.zeros_like(ones), ones])
        out[meta + "attn.proj.weight"] = state[timm + "attn.proj.weight"]
        out[meta + "attn.proj.bias"] = state[timm + "attn.proj.bias"]
        out[meta + "ls1.gamma"] = state[timm + "gamma_1"]
        out[meta + "norm2.weight"] = state[timm + "norm2.weight"]
        out[meta + "norm2.bias"] = state[timm + "norm2.bias"]
        if timm + "mlp.fc1_g.weight" in state:  # SwiGLU: w1 gate, w2 value, w3 out
            names = {"mlp.fc1_g": "mlp.w1", "mlp.fc1_x": "mlp.w2", "mlp.fc2": "mlp.w3"}
        else:
            names = {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for timm_name, meta_name in names.items():
            for suffix in (".weight", ".bias"):
                if timm + timm_name + suffix in state:
                    out[meta + meta_name + suffix] = state[timm + timm_name + suffix]
        out[meta + "ls2.gamma"] = state[timm + "gamma_2"]
    out["norm.weight"] = state["norm.weight"]
    out["norm.bias"] = state["norm.bias"]
    if spec.name in UNTIED_CLS_NORM:  # different from `norm`, so using it by mistake changes the cls output
        out["local_cls_norm.weight"] = -state["norm.weight"]
        out["local_cls_norm.bias"] = state["norm.bias"] + 1
    return out


def _convnext_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    block_names = {
        "gamma": "gamma",
        "conv_dw": "dwconv",
        "norm": "norm",
        "mlp.fc1": "pwconv1",
        "mlp.fc2": "pwconv2",
    }
    downsample, stages = {}, {}
    for key, value in state.items():
        if key.startswith("stem."):
            downsample["downsample_layers.0." + key.removeprefix("stem.")] = value
        elif match := re.match(r"stages\.(\d+)\.downsample\.(\d+)\.(.+)", key):
            downsample["downsample_layers.{}.{}.{}".format(*match.groups())] = value
        elif match := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", key):
            stage, block, name, suffix = match.groups()
            stages[f"stages.{stage}.{block}.{block_names[name]}{suffix or ''}"] = value
        elif not key.startswith("head.norm."):
            raise KeyError(f"unexpected timm ConvNeXt key {key}")
    # Meta stores the final norm twice (`norm` and `norms.3`), the same Parameter: keep them aliased.
    norm = {"norm.weight": state["head.norm.weight"], "norm.bias": state["head.norm.bias"]}
    norms = {"norms.3.weight": state["head.norm.weight"], "norms.3.bias": state["head.norm.bias"]}
    return {**downsample, **stages, **norm, **norms}


def sha256_file(path: Path) -> str:
    """Plain SHA-256, independent of dinov3ds.models.weights.hashes so the name check tests the library, not itself."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def official_name(spec: BackboneSpec, sha256: str) -> str:
    """Meta's file name for `spec` with this file's own hash prefix."""
    return f"{spec.weight_file.rsplit('-', 1)[0]}-{sha256[:8]}.pth"


def write_official_checkpoint(name: str, folder: Path, *, depth: int = 1, seed: int = 0, **overrides) -> Path:
    """Write a random `name` checkpoint in Meta's format to `folder`; returns its official-looking path.

    `load_backbone(name, path, depth=depth, **overrides)` reproduces `source_backbone(name, depth=depth,
    seed=seed, **overrides)` exactly. The file is hashed after writing and renamed to carry its SHA-256 prefix.
    """
    spec = get_spec(name)
    backbone = source_backbone(name, depth=depth, seed=seed, **overrides)
    num_heads = backbone.model.blocks[0].attn.num_heads if spec.family == "vit" else None
    state = timm_to_official(backbone.model.state_dict(), spec, num_heads)
    del backbone
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{spec.name}.{os.getpid()}.partial"
    torch.save(state, temporary)
    del state
    path = folder / official_name(spec, sha256_file(temporary))
    os.replace(temporary, path)
    return path
