"""The three key layouts DINOv3 weights come in (Meta's, timm's, transformers'), told apart by their keys.

A state dict is recognised from its key names, never from its file name, and converted to the key names
of the timm model dinov3ds builds: Meta's through timm's own converter, transformers' first to Meta's
names (the inverse of the mapping in the reference fixtures' README) and then through the same converter,
timm's as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from timm.models import convnext as timm_convnext
from timm.models import eva as timm_eva
from torch import Tensor, nn

Format = Literal["meta", "timm", "transformers"]
Family = Literal["vit", "convnext"]


@dataclass(frozen=True)
class Layout:
    """Where one format keeps what `describe` needs to name a file's architecture."""

    format: Format
    family: Family
    signature: tuple[str, ...]  # keys only this layout has
    width_key: str  # a tensor whose shape tells the width (ViT: [.., C]; ConvNeXt: last stage's conv [C, ..])
    block_pattern: str = ""  # ViT: regex capturing a block's index
    swiglu_marker: str = ""  # ViT: a key fragment only SwiGLU blocks have


LAYOUTS = (
    Layout("meta", "vit", ("cls_token", "storage_tokens"), "cls_token", r"^blocks\.(\d+)\.", ".mlp.w1."),
    Layout("timm", "vit", ("cls_token", "reg_token"), "cls_token", r"^blocks\.(\d+)\.", ".mlp.fc1_g."),
    Layout("transformers", "vit", ("embeddings.cls_token", "embeddings.register_tokens"), "embeddings.cls_token",
           r"^layer\.(\d+)\.", ".mlp.gate_proj."),
    Layout("meta", "convnext", ("downsample_layers.0.0.weight",), "downsample_layers.3.1.weight"),
    Layout("timm", "convnext", ("stem.0.weight", "head.norm.weight"), "stages.3.downsample.1.weight"),
    Layout("transformers", "convnext", ("stages.0.downsample_layers.0.weight",), "stages.3.downsample_layers.1.weight"),
)  # fmt: skip


def canonical(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers files name blocks `layer.N` while its models say `model.layer.N`: drop that prefix (no
    Meta or timm key starts with it), so a state dict taken from either gives the same keys."""
    return {key.removeprefix("model."): value for key, value in state.items()}


def detect(state: dict[str, Tensor]) -> Layout | None:
    """The layout of a DINOv3 backbone state dict (keys as `canonical` gives them), or None."""
    return next((layout for layout in LAYOUTS if all(key in state for key in layout.signature)), None)


def describe(state: dict[str, Tensor]) -> dict:
    """Format, family, width and depth of a state dict, so a wrong file gets a message saying what it holds."""
    layout = detect(state)
    if layout is None:
        return {"format": None, "family": None, "summary": "no DINOv3 backbone weights"}
    info = {"format": layout.format, "family": layout.family}
    if layout.family == "convnext":
        width = state[layout.width_key].shape[0]
        return {**info, "embed_dim": width, "summary": f"a DINOv3 ConvNeXt with last width {width} ({layout.format} format)"}
    width = state[layout.width_key].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(layout.block_pattern, k)))
    ffn = "SwiGLU" if any(layout.swiglu_marker in k for k in state) else "MLP"
    summary = f"a DINOv3 ViT of width {width}, depth {depth}, {ffn} FFN ({layout.format} format)"
    return {**info, "embed_dim": width, "depth": depth, "summary": summary}


def to_timm(state: dict[str, Tensor], layout: Layout, model: nn.Module) -> dict[str, Tensor]:
    """The state dict in `model`'s (timm's) key names."""
    if layout.format == "timm":
        return _with_zero_qv_biases(state, model) if layout.family == "vit" else dict(state)
    if layout.format == "transformers":
        state = _transformers_vit_to_meta(state) if layout.family == "vit" else _transformers_convnext_to_meta(state)
    converter = timm_eva.checkpoint_filter_fn if layout.family == "vit" else timm_convnext.checkpoint_filter_fn
    return converter(state, model)


def _with_zero_qv_biases(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm's hub files without `_qkvb` in their name have no q/v biases; the `_qkvb` model dinov3ds builds
    computes exactly the same with them at zero."""
    dtype = state["cls_token"].dtype
    missing = {k: torch.zeros(v.shape, dtype=dtype) for k, v in model.state_dict().items()
               if k.endswith((".attn.q_bias", ".attn.v_bias")) and k not in state}  # fmt: skip
    return {**state, **missing}


_HF_VIT_BLOCK = {  # transformers name in a block → Meta's
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias", "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias", "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}  # fmt: skip
_HF_MLP = {"up_proj": "fc1", "down_proj": "fc2"}
_HF_SWIGLU = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}  # silu(w1 x) * (w2 x) → w3


def _transformers_vit_to_meta(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {
        "cls_token": state["embeddings.cls_token"],
        "storage_tokens": state["embeddings.register_tokens"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if "embeddings.mask_token" in state:
        out["mask_token"] = state["embeddings.mask_token"].reshape(1, -1)
    gated = any(".mlp.gate_proj." in k for k in state)
    mlp = {f"mlp.{hf}.{kind}": f"mlp.{meta}.{kind}" for hf, meta in (_HF_SWIGLU if gated else _HF_MLP).items()
           for kind in ("weight", "bias")}  # fmt: skip
    names = {**_HF_VIT_BLOCK, **mlp}
    for key, value in state.items():
        match = re.match(r"^layer\.(\d+)\.(.+)$", key)
        if match and match.group(2) in names:
            out[f"blocks.{match.group(1)}.{names[match.group(2)]}"] = value
    for index in sorted({int(m.group(1)) for k in state if (m := re.match(r"^layer\.(\d+)\.", k))}):
        prefix = f"layer.{index}.attention."
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat([state[f"{prefix}{n}_proj.weight"] for n in "qkv"])
        if f"{prefix}q_proj.bias" in state:  # Meta's k bias is masked to zero; transformers stores none
            q_bias, v_bias = state[f"{prefix}q_proj.bias"], state[f"{prefix}v_proj.bias"]
            out[f"blocks.{index}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


_HF_CONVNEXT_BLOCK = {"depthwise_conv": "dwconv", "layer_norm": "norm", "pointwise_conv1": "pwconv1",
                      "pointwise_conv2": "pwconv2"}  # fmt: skip


def _transformers_convnext_to_meta(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("layer_norm."):
            out[key.replace("layer_norm.", "norm.", 1)] = value
        elif match := re.match(r"^stages\.(\d+)\.downsample_layers\.(.+)$", key):
            out[f"downsample_layers.{match.group(1)}.{match.group(2)}"] = value
        elif match := re.match(r"^stages\.(\d+)\.layers\.(\d+)\.(\w+)(\.\w+)?$", key):
            stage, block, name, kind = match.groups()
            out[f"stages.{stage}.{block}.{_HF_CONVNEXT_BLOCK.get(name, name)}{kind or ''}"] = value
    return out
