"""Key mapping: where each tensor of a file goes in the timm model dinov3ds builds, decided from names and
shapes alone, before any byte is read.

A `Placement` copies a tensor (or a row range of it) into a parameter (or a row range of it): Meta's fused
`qkv.bias` splits into timm's `q_bias` and `v_bias` (the k bias is fixed at zero), transformers' separate
q/k/v projections fill the rows of timm's fused `qkv.weight`. Meta's names follow the rules of timm's own
converters (`timm.models.eva` / `convnext.checkpoint_filter_fn`; `tests/test_weights.py` checks that both
give the same model); transformers' names are first renamed to Meta's (the inverse of the mapping in the
reference fixtures' README).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dinov3ds.models.weights.formats import Layout

Rows = tuple[int, int] | None  # [start, stop) along the first dimension; None: the whole tensor
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Placement:
    source: str  # tensor name in the file
    target: str  # parameter or persistent buffer name in the timm model
    source_rows: Rows = None
    target_rows: Rows = None


ZERO_WHEN_ABSENT = (".attn.q_bias", ".attn.v_bias")  # timm's hub files without `_qkvb` hold no q/v biases


def plan(shapes: Shapes, layout: Layout, targets: Shapes) -> list[Placement]:
    """Every placement for a file's tensors into a model whose parameters have `targets`' shapes."""
    rules: Callable[[str, Shapes, Shapes], list[Placement]] = {
        ("meta", "vit"): _meta_vit, ("transformers", "vit"): _transformers_vit,
        ("meta", "convnext"): _meta_convnext, ("transformers", "convnext"): _transformers_convnext,
    }.get((layout.format, layout.family), _same_names)  # fmt: skip
    placements = [placement for key in shapes for placement in rules(key, shapes, targets)]
    # A model built without q/v biases (ViT-7B) takes none, as timm's converter skips them.
    return [p for p in placements if p.target in targets or not p.target.endswith(ZERO_WHEN_ABSENT)]


def mismatches(placements: list[Placement], shapes: Shapes, targets: Shapes) -> list[str]:
    """Why the placements do not fill the model exactly: unknown targets, shape mismatches, parameters left
    empty (the q/v biases excepted, which are zero then). Empty when the file fits."""
    problems, filled = [], dict.fromkeys(targets, 0)
    for placement in placements:
        if placement.target not in targets:
            problems.append(f"{placement.source} → {placement.target} (not in the model)")
            continue
        source, target = _region(shapes[placement.source], placement.source_rows), _region(targets[placement.target], placement.target_rows)
        if not fits(source, target):
            problems.append(f"{placement.source} {list(source)} → {placement.target} {list(target)}")
            continue
        filled[placement.target] += math.prod(target)
    problems += [name for name, count in filled.items()
                 if count != math.prod(targets[name]) and not (count == 0 and name.endswith(ZERO_WHEN_ABSENT))]  # fmt: skip
    return problems


def fits(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Equal shapes, or equal after dropping size-1 dimensions (Meta's ConvNeXt GRN [1, 1, 1, C] → [C])."""
    return source == target or [d for d in source if d != 1] == [d for d in target if d != 1]


def _region(shape: tuple[int, ...], rows: Rows) -> tuple[int, ...]:
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def _same_names(key: str, shapes: Shapes, targets: Shapes) -> list[Placement]:
    return [Placement(key, key)]


# --- Meta's ViT → timm ---------------------------------------------------------------------------------------
_META_VIT_SKIPPED = re.compile(r"(\.periods|\.bias_mask|mask_token)$|^(projectors\.|local_cls_norm)|rope")
_META_VIT_RENAMES = (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"), ("storage_tokens", "reg_token"),
                     ("mlp.w12", "mlp.fc1"), ("mlp.w1", "mlp.fc1_g"), ("mlp.w2", "mlp.fc1_x"), ("mlp.w3", "mlp.fc2"))  # fmt: skip


def _meta_vit(key: str, shapes: Shapes, targets: Shapes) -> list[Placement]:
    return _meta_vit_as(key, key, shapes[key])


def _meta_vit_as(source: str, meta_name: str, shape: tuple[int, ...], rows: Rows = None) -> list[Placement]:
    """Placements of a tensor that has Meta's name `meta_name` (`rows`: where it sits in Meta's tensor)."""
    if _META_VIT_SKIPPED.search(meta_name):
        return []
    if meta_name.endswith("attn.qkv.bias"):
        return _split_qkv_bias(source, meta_name.removesuffix("qkv.bias"), shape, rows)
    for old, new in _META_VIT_RENAMES:
        meta_name = meta_name.replace(old, new)
    return [Placement(source, meta_name, target_rows=rows)]


def _split_qkv_bias(source: str, prefix: str, shape: tuple[int, ...], rows: Rows) -> list[Placement]:
    """Meta's [q | k | v] bias → timm's q_bias and v_bias (its k bias is a zero buffer); a tensor that is one
    third of it (`rows`: transformers' separate q or v bias) goes to its part whole."""
    width = shape[0] // 3 if rows is None else shape[0]
    parts = {0: "q_bias", 2: "v_bias"}
    if rows is not None:
        part = rows[0] // width
        return [Placement(source, prefix + parts[part])] if part in parts else []
    return [Placement(source, prefix + name, source_rows=(i * width, (i + 1) * width)) for i, name in parts.items()]


# --- transformers' ViT → Meta's names → timm -----------------------------------------------------------------
_HF_VIT_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "embeddings.mask_token": "mask_token",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}  # fmt: skip
_HF_VIT_BLOCK = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias", "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias", "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}  # fmt: skip
_HF_MLP = {"up_proj": "fc1", "down_proj": "fc2"}
_HF_SWIGLU = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}  # silu(w1 x) * (w2 x) → w3
_HF_QKV = re.compile(r"^attention\.([qkv])_proj\.(weight|bias)$")


def _transformers_vit(key: str, shapes: Shapes, targets: Shapes) -> list[Placement]:
    if key in _HF_VIT_TOP:
        return _meta_vit_as(key, _HF_VIT_TOP[key], shapes[key])
    match = re.match(r"^layer\.(\d+)\.(.+)$", key)
    if not match:
        return [Placement(key, key)]  # unknown: reported as not in the model
    block, name = f"blocks.{match.group(1)}.", match.group(2)
    if qkv := _HF_QKV.match(name):
        width = shapes[key][0]
        index = "qkv".index(qkv.group(1))
        return _meta_vit_as(key, f"{block}attn.qkv.{qkv.group(2)}", shapes[key], (index * width, (index + 1) * width))
    gated = any(".mlp.gate_proj." in k for k in shapes)
    mlp = {f"mlp.{hf}.{kind}": f"mlp.{meta}.{kind}" for hf, meta in (_HF_SWIGLU if gated else _HF_MLP).items()
           for kind in ("weight", "bias")}  # fmt: skip
    meta_name = {**_HF_VIT_BLOCK, **mlp}.get(name)
    return _meta_vit_as(key, block + meta_name, shapes[key]) if meta_name else [Placement(key, key)]


# --- ConvNeXt: transformers' → Meta's names → timm ----------------------------------------------------------
_META_CONVNEXT_RULES = (
    (r"^downsample_layers\.0\.", "stem."), (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^downsample_layers\.(\d+)\.(\d+)", r"stages.\1.downsample.\2"), (r"dwconv", "conv_dw"), (r"pwconv", "mlp.fc"),
    (r"grn\.beta", "mlp.grn.bias"), (r"grn\.gamma", "mlp.grn.weight"), (r"^head\.", "head.fc."), (r"^norm\.", "head.norm."),
)  # fmt: skip
_HF_CONVNEXT_BLOCK = {"depthwise_conv": "dwconv", "layer_norm": "norm", "pointwise_conv1": "pwconv1",
                      "pointwise_conv2": "pwconv2"}  # fmt: skip


def _meta_convnext(key: str, shapes: Shapes, targets: Shapes) -> list[Placement]:
    return _meta_convnext_as(key, key)


def _meta_convnext_as(source: str, meta_name: str) -> list[Placement]:
    if meta_name.startswith(("projectors.", "norms.")):
        return []
    for pattern, replacement in _META_CONVNEXT_RULES:
        meta_name = re.sub(pattern, replacement, meta_name)
    return [Placement(source, meta_name)]


def _transformers_convnext(key: str, shapes: Shapes, targets: Shapes) -> list[Placement]:
    if key.startswith("layer_norm."):
        return _meta_convnext_as(key, key.replace("layer_norm.", "norm.", 1))
    if match := re.match(r"^stages\.(\d+)\.downsample_layers\.(.+)$", key):
        return _meta_convnext_as(key, f"downsample_layers.{match.group(1)}.{match.group(2)}")
    if match := re.match(r"^stages\.(\d+)\.layers\.(\d+)\.(\w+)(\.\w+)?$", key):
        stage, block, name, kind = match.groups()
        return _meta_convnext_as(key, f"stages.{stage}.{block}.{_HF_CONVNEXT_BLOCK.get(name, name)}{kind or ''}")
    return []
