"""The three key layouts DINOv3 weights come in (Meta's, timm's, transformers'), told apart by their keys.

A file is recognised from its tensor names and shapes (no bytes read), never from its file name, and
checked against the variant asked for before anything is allocated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dinov3ds.errors import UserError
from dinov3ds.models.variants import BackboneSpec

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


def _shape(value: object) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", value))


def detect(shapes: Mapping[str, object]) -> Layout | None:
    """The layout of a DINOv3 backbone's tensors (name → shape or tensor, names as `canonical` gives them)."""
    return next((layout for layout in LAYOUTS if all(key in shapes for key in layout.signature)), None)


def describe(shapes: Mapping[str, object]) -> dict:
    """Format, family, width and depth of a set of tensors, so a wrong file gets a message saying what it holds."""
    layout = detect(shapes)
    if layout is None:
        return {"format": None, "family": None, "summary": "no DINOv3 backbone weights"}
    info = {"format": layout.format, "family": layout.family}
    if layout.family == "convnext":
        width = _shape(shapes[layout.width_key])[0]
        return {**info, "embed_dim": width, "summary": f"a DINOv3 ConvNeXt with last width {width} ({layout.format} format)"}
    width = _shape(shapes[layout.width_key])[-1]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(layout.block_pattern, k)))
    ffn = "SwiGLU" if any(layout.swiglu_marker in k for k in shapes) else "MLP"
    summary = f"a DINOv3 ViT of width {width}, depth {depth}, {ffn} FFN ({layout.format} format)"
    return {**info, "embed_dim": width, "depth": depth, "summary": summary}


def identify(shapes: Mapping[str, object], spec: BackboneSpec, overrides: dict, path: Path) -> Layout:
    """The file's layout, once it is sure the file holds the family and width of `spec` (else a UserError
    saying what the file holds)."""
    layout, found = detect(shapes), describe(shapes)
    width_overridden = "embed_dim" in overrides or "dims" in overrides
    if layout is None or layout.family != spec.family or (found["embed_dim"] != spec.embed_dim and not width_overridden):
        raise UserError(
            f"{path} holds {found['summary']}, but backbone '{spec.name}' expects a {spec.family} of width "
            f"{spec.embed_dim} ({spec.weight_file}); set the backbone name that matches the file or use the right file"
        )
    return layout
