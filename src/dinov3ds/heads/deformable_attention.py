"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159) in pure PyTorch.

Each query looks at a few learned points per head and level instead of every key, so the cost grows with
the number of queries, not with queries x keys. The usual implementations ship a compiled CUDA kernel;
this one is `F.grid_sample` only, so it runs forward and backward on CPU, any GPU and under ONNX export.
It keeps that kernel's contract: sampling locations are normalised to [0, 1] per level with (x, y) order,
pixel centres sit at (i + 0.5) / size (`align_corners=False`) and points outside a map read zeros.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinearly sample each level at the given points and sum the samples with the given weights.

    Args:
        value: [B, S, heads, head_dim], the levels' maps flattened row-major and concatenated (S = sum H*W).
        spatial_shapes: [L, 2] (H, W) of each level, in the order they are concatenated in `value`.
        sampling_locations: [B, Q, heads, L, P, 2] (x, y) in [0, 1]; outside that range reads zeros.
        attention_weights: [B, Q, heads, L, P], usually a softmax over L*P.

    Returns:
        [B, Q, heads * head_dim].
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1]; with align_corners=False that maps x in [0, 1] to pixel x * W - 0.5.
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (height, width) in enumerate(shapes):
        level_value = value_levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*heads, head_dim, Q, P]
    sampled = torch.stack(samples, dim=-2).flatten(-2)  # [B*heads, head_dim, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (sampled * weights).sum(-1)  # [B*heads, head_dim, Q]
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Queries attend to `num_points` predicted locations per head on each of `num_levels` value maps.

    Args:
        dim: width of queries, of the value input and of the output.
        num_heads: attention heads; must divide the value width `int(dim * value_ratio)`.
        num_levels: number of value maps given to `forward`.
        num_points: sampling points per head and level.
        value_ratio: the value projection's width relative to `dim`; ViT-Adapter uses 0.5 to halve the
            cost of the two largest matrices without a measurable loss.
    """

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, value_ratio: float = 1.0
    ) -> None:
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"value width {value_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start with each head looking in its own direction at 1..P pixels and with uniform weights, as
        Deformable DETR does: random offsets would make early training sample arbitrary places."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((bias * distances).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Attend from `query` [B, Q, dim] around `reference_points` [B or 1, Q, 2] ((x, y) in [0, 1], the
        same normalised point on every level) into `value` [B, S, dim], the levels flattened and
        concatenated; returns [B, Q, dim]. Offsets are predicted in pixels of each level."""
        batch, queries, _ = query.shape
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"{len(spatial_shapes)} value levels given, {self.num_levels} expected")
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(batch, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, None, None, :] + offsets / sizes[:, None, :]
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
