"""Export-only stand-ins for the Python that computes from an input's size, so one graph serves every size.

The TorchScript exporter records arithmetic on an input's traced sizes but freezes Python numbers made from
them: timm's DINOv3 RoPE divides its grid by `float(H)` and deformable attention builds `torch.tensor(sizes)`
and splits by `int(h) * int(w)`, so a traced graph would keep the example's size and answer other sizes
wrongly without an error. While `traceable(model)` is open, those two are replaced on the model's own
instances by the same float32 operations on the traced sizes (bit-equal in eager mode: tests check it); the
model's code and numerics are untouched, and the export's parity check at three sizes would name any other
frozen size.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import Tensor, nn

from dinov3ds.heads.deformable_attention import MultiScaleDeformableAttention

Side = int | Tensor  # a Python int in eager mode, a traced 0-dim tensor while exporting


def rope_embed(rope: RotaryEmbeddingDinoV3, shape: Sequence[Side] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """timm's `RotaryEmbeddingDinoV3.get_embed` (centred grid, each axis normalised by its own length) with
    the lengths kept as graph values: (arange(0.5, s) + offset) / s per axis, mapped to [-1, 1]."""
    if shape is None or rope.training:
        return RotaryEmbeddingDinoV3.get_embed(rope, shape, dtype)
    if rope.normalize_coords != "separate" or rope.grid_indexing != "ij":
        raise NotImplementedError(f"RoPE grid {rope.normalize_coords}/{rope.grid_indexing} has no traceable form")
    axes = [(torch.arange(0.5, side, dtype=torch.float32) + rope.grid_offset) / side for side in shape]
    grid = 2.0 * torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1) - 1.0
    sin, cos = rope._get_pos_embed_from_coords(grid.flatten(0, -2))
    embed = torch.cat([sin, cos], dim=-1)
    return embed if dtype is None else embed.to(dtype)


def deformable_attention(module: MultiScaleDeformableAttention, query: Tensor, reference_points: Tensor,
                         value: Tensor, spatial_shapes: Sequence[tuple[Side, Side]]) -> Tensor:  # fmt: skip
    """`MultiScaleDeformableAttention.forward` with each level's size kept as graph values: the levels cut
    by slicing at running offsets instead of `split(int(h) * int(w))`, the pixel sizes stacked from the
    traced sizes instead of `torch.tensor`."""
    batch, queries, _ = query.shape
    heads, levels, points = module.num_heads, module.num_levels, module.num_points
    value = module.value_proj(value).view(batch, value.shape[1], heads, -1)
    offsets = module.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
    weights = module.attention_weights(query).view(batch, queries, heads, levels * points)
    weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
    sizes = torch.stack([torch.stack([torch.as_tensor(w), torch.as_tensor(h)]) for h, w in spatial_shapes])
    locations = reference_points[:, :, None, None, None, :] + offsets / sizes.to(query)[:, None, :]
    grids = 2 * locations - 1
    head_dim, start, samples = value.shape[-1], 0, []
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = value[:, start : start + height * width]
        start = start + height * width
        level_value = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(samples, dim=-2).flatten(-2)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (sampled * weights).sum(-1).view(batch, heads * head_dim, queries).transpose(1, 2)
    return module.output_proj(output)


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s RoPE and deformable attention instances compute from traced sizes."""
    patched = []
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingDinoV3):
            module.get_embed = types.MethodType(rope_embed, module)
            patched.append((module, "get_embed"))
        elif isinstance(module, MultiScaleDeformableAttention):
            module.forward = types.MethodType(deformable_attention, module)
            patched.append((module, "forward"))
    try:
        yield model
    finally:
        for module, name in patched:
            delattr(module, name)
