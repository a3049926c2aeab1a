"""ViT-Adapter without injector (arXiv 2205.08534, as DINOv3's segmentation adapter builds it): multi-scale
maps at strides 4-32 for a plain, frozen ViT. Shared by the `fapm` and `unet_adapter` heads.

A small CNN on the image (spatial prior) gives maps at strides 4/8/16/32; the stride-8/16/32 tokens query the
ViT taps in turn with deformable cross-attention (one extractor per tap, `extra_extractors` more on the last
tap) and a ConvFFN with DropPath; the stride-4 map gets the up-sampled stride-8 map; each map gets its tap's
features added, then a BatchNorm. The taps are read, never written back (no injector): the backbone stays frozen.
"""

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from dinov3ds.heads.deformable_attention import MultiScaleDeformableAttention

NUM_TAPS = 4


class SpatialPriorModule(nn.Module):
    """A ResNet-like stem on the image for the local detail a stride-16 ViT never sees; returns maps at
    strides 4, 8, 16 and 32, each projected to `dim`."""

    def __init__(self, dim: int, channels: int = 64) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *conv(3, channels, 2),
            *conv(channels, channels, 1),
            *conv(channels, channels, 1),
            nn.MaxPool2d(3, 2, 1),
        )
        widths = [channels, 2 * channels, 4 * channels, 4 * channels]
        self.downs = nn.ModuleList(
            nn.Sequential(*conv(cin, cout, 2)) for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.projections = nn.ModuleList(nn.Conv2d(width, dim, 1) for width in widths)

    def forward(self, image: Tensor) -> list[Tensor]:
        maps = [self.stem(image)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        return [projection(x) for projection, x in zip(self.projections, maps, strict=True)]


class ConvFFN(nn.Module):
    """ViT-Adapter's feed-forward: a depthwise 3x3 between the two linears gives tokens local context."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        x = self.fc1(tokens)
        parts = []
        for part, (height, width) in zip(x.split([h * w for h, w in shapes], dim=1), shapes, strict=True):
            grid = part.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            parts.append(self.depthwise(grid).flatten(2).transpose(1, 2))
        return self.fc2(F.gelu(torch.cat(parts, dim=1)))


class Extractor(nn.Module):
    """Adapter tokens (queries) gather from one ViT tap (1-level value) by deformable cross-attention,
    then a ConvFFN; both pre-norm residual, as in ViT-Adapter."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_points: int,
        value_ratio: float,
        ffn_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MultiScaleDeformableAttention(dim, num_heads, 1, num_points, value_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, query: Tensor, reference_points: Tensor, feature: Tensor, query_shapes: list[tuple[int, int]]
    ) -> Tensor:
        tokens = self.feature_norm(feature.flatten(2).transpose(1, 2))
        feature_shape = [(feature.shape[-2], feature.shape[-1])]
        query = query + self.attention(self.query_norm(query), reference_points, tokens, feature_shape)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))


def reference_points(shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
    """Pixel centres of each map, normalised to [0, 1] as (x, y): [1, sum H*W, 2]."""
    points = []
    for height, width in shapes:
        ys = (torch.arange(height, dtype=like.dtype, device=like.device) + 0.5) / height
        xs = (torch.arange(width, dtype=like.dtype, device=like.device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1))
    return torch.cat(points)[None]


class Adapter(nn.Module):
    """ViT-Adapter without injector: the frozen taps are read, never written back."""

    def __init__(
        self,
        dim: int,
        conv_channels: int,
        num_heads: int,
        num_points: int,
        value_ratio: float,
        ffn_ratio: float,
        drop_path: float,
        extra_extractors: int,
    ) -> None:
        super().__init__()
        self.spatial_prior = SpatialPriorModule(dim, conv_channels)
        self.level_embed = nn.Parameter(torch.empty(3, dim).normal_())
        self.extractors = nn.ModuleList(
            Extractor(dim, num_heads, num_points, value_ratio, ffn_ratio, drop_path)
            for _ in range(NUM_TAPS + extra_extractors)
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        # Plain BatchNorm: Lightning's `sync_batchnorm=True` converts it to SyncBatchNorm under DDP.
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(NUM_TAPS))

    def forward(self, taps: list[Tensor], image: Tensor) -> list[Tensor]:
        c1, *coarse = self.spatial_prior(image)
        shapes = [(c.shape[-2], c.shape[-1]) for c in coarse]
        query = torch.cat(
            [
                (c + embed[:, None, None]).flatten(2).transpose(1, 2)
                for c, embed in zip(coarse, self.level_embed, strict=True)
            ],
            dim=1,
        )
        points = reference_points(shapes, query)
        # One extractor per tap; the extra ones read the last tap again (DINOv3's `use_extra_extractor`).
        for index, extractor in enumerate(self.extractors):
            query = extractor(query, points, taps[min(index, NUM_TAPS - 1)], shapes)
        c2, c3, c4 = (
            part.transpose(1, 2).reshape(image.shape[0], -1, h, w)
            for part, (h, w) in zip(query.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
        )
        maps = [self.up(c2) + c1, c2, c3, c4]
        maps = [
            m + F.interpolate(tap, size=m.shape[-2:], mode="bilinear", align_corners=False)
            for m, tap in zip(maps, taps, strict=True)
        ]
        return [norm(m) for norm, m in zip(self.norms, maps, strict=True)]
