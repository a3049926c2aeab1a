"""The `fapm` head: Dino U-Net (arXiv 2508.20909) on a frozen DINOv3 backbone.

Three parts, all trained, the backbone never touched:
1. A ViT-Adapter (arXiv 2205.08534) *without injector*: a small CNN on the image (spatial prior) gives
   maps at strides 4/8/16/32; the stride-8/16/32 tokens query each of the 4 ViT taps in turn with
   deformable cross-attention (one extractor per tap); the stride-4 map gets the upsampled stride-8 map,
   and each map gets its tap's features added (`add_vit_feature`), then a BatchNorm.
2. FAPM (fidelity-aware projection) per scale: shared and per-scale 1x1 projections to `rank`, FiLM of
   the per-scale branch by the shared one, a refinement block and a residual 1x1 down to `out_channels`.
   A plain 1x1 from 1024 to 32 channels throws away most of what DINOv3 encodes; FAPM is the paper's
   answer to that.
3. A U-Net decoder: transposed conv x2 up, concat the skip, two conv3x3-InstanceNorm-LeakyReLU, from
   stride 32 to full resolution, then a 1x1 classifier.

The adapter width is the backbone's embed dim, as in the paper (DINOv3's ViT-Adapter: 16 deformable
heads, 4 points, value ratio 0.5, ConvFFN ratio 0.25, spatial-prior width 64). Trainable parameters with
2 classes: ViT-S (384) 5.33 M, ViT-B (768) 10.83 M, ViT-L (1024) 16.14 M against the paper's ~5 / ~11 /
~18 M. The adapter is most of it and grows with the embed dim squared (ViT-L: 7.1 M in extractors, 4.2 M
in the stride-8 to stride-4 transposed conv). L is 10 % low because DINOv3's ViT-Adapter, which the
paper's code uses, runs two extra extractors after the last tap (1.78 M each at width 1024, giving
19.7 M); here there is one extractor per tap, which puts S and B on target (with the extras they would
be 5.9 M and 12.9 M).

Designed for ViT taps (all at stride 16); taps of other widths or strides (ConvNeXt) are first projected
to a common width with a 1x1 conv and work too. Input sides must be multiples of 32.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, tap_norms
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
        self, dim: int, num_heads: int, num_points: int, value_ratio: float, ffn_ratio: float
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = MultiScaleDeformableAttention(dim, num_heads, 1, num_points, value_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))

    def forward(
        self, query: Tensor, reference_points: Tensor, feature: Tensor, query_shapes: list[tuple[int, int]]
    ) -> Tensor:
        tokens = self.feature_norm(feature.flatten(2).transpose(1, 2))
        feature_shape = [(feature.shape[-2], feature.shape[-1])]
        query = query + self.attention(self.query_norm(query), reference_points, tokens, feature_shape)
        return query + self.ffn(self.ffn_norm(query), query_shapes)


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
    ) -> None:
        super().__init__()
        self.spatial_prior = SpatialPriorModule(dim, conv_channels)
        self.level_embed = nn.Parameter(torch.empty(3, dim).normal_())
        self.extractors = nn.ModuleList(
            Extractor(dim, num_heads, num_points, value_ratio, ffn_ratio) for _ in range(NUM_TAPS)
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
        for extractor, tap in zip(self.extractors, taps, strict=True):
            query = extractor(query, points, tap, shapes)
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


class SqueezeExcitation(nn.Module):
    """Channel gating from global context (Hu et al., arXiv 1709.01507). GELU rather than ReLU inside: with
    only 2-16 hidden units (r=16) a ReLU can go dead for every unit and freeze the gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def refinement(rank: int, width: int) -> nn.Sequential:
    """1x1 down to `width`, IN + LeakyReLU, depthwise-separable 3x3 (a nonlinearity after it, else it and
    the next 1x1 would collapse into one linear map), 1x1, squeeze-and-excitation."""
    return nn.Sequential(
        nn.Conv2d(rank, width, 1),
        nn.InstanceNorm2d(width, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(width, width, 3, padding=1, groups=width),
        nn.Conv2d(width, width, 1),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(width, width, 1),
        SqueezeExcitation(width),
    )


class FidelityAwareProjection(nn.Module):
    """FAPM: compresses each adapter map to `rank` along a shared and a per-scale basis, lets the shared
    branch modulate the per-scale one (FiLM), then refines down to the decoder's width with a residual."""

    def __init__(self, dim: int, rank: int, out_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.shared = nn.Conv2d(dim, rank, 1)
        self.specific = nn.ModuleList(nn.Conv2d(dim, rank, 1) for _ in out_channels)
        self.film = nn.ModuleList(nn.Conv2d(rank, 2 * rank, 1) for _ in out_channels)
        self.refine = nn.ModuleList(refinement(rank, width) for width in out_channels)
        self.shortcut = nn.ModuleList(nn.Conv2d(rank, width, 1) for width in out_channels)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        outputs = []
        for i, x in enumerate(maps):
            gamma, beta = self.film[i](self.shared(x)).chunk(2, dim=1)
            # (1 + gamma): at initialisation the modulation is near identity instead of a random gate.
            z = self.specific[i](x) * (1 + gamma) + beta
            outputs.append(self.refine[i](z) + self.shortcut[i](z))
        return outputs


def conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    """nnU-Net's block: the bias is dropped because InstanceNorm's affine shift replaces it."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UpStage(nn.Module):
    """Transposed conv x2 up, concat the skip (if any), two conv blocks."""

    def __init__(self, cin: int, cout: int, skip: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.blocks = nn.Sequential(conv_norm_act(cout + skip, cout), conv_norm_act(cout, cout))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        return self.blocks(x if skip is None else torch.cat([x, skip], dim=1))


class FAPMHead(SegmentationHead):
    """Dino U-Net: ViT-Adapter (no injector) + FAPM + U-Net decoder; see the module docstring.

    Args:
        in_channels, strides, num_classes: as for every head (4 taps).
        adapter_dim: adapter width; None uses the last tap's width (the ViT embed dim), as the paper.
        conv_channels: width of the spatial-prior CNN's first stage (64, 128, 256, 256 after it).
        rank: FAPM's projection width.
        out_channels: FAPM output (= decoder) widths at strides 4, 8, 16, 32; the stride-2 and full
            resolution stages use half the first.
        num_heads, num_points: deformable attention heads and sampling points per head.
        value_ratio: deformable attention value width relative to `adapter_dim`.
        ffn_ratio: ConvFFN hidden width relative to `adapter_dim`.
    """

    input_multiple = 32  # the adapter's deepest map is at stride 32

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        adapter_dim: int | None = None,
        conv_channels: int = 64,
        rank: int = 256,
        out_channels: tuple[int, ...] = (32, 64, 128, 256),
        num_heads: int = 16,
        num_points: int = 4,
        value_ratio: float = 0.5,
        ffn_ratio: float = 0.25,
        **options,
    ) -> None:
        super().__init__(in_channels, strides, num_classes, **options)
        if len(in_channels) != NUM_TAPS:
            raise UserError(
                f"the fapm head needs {NUM_TAPS} backbone taps, got {len(in_channels)}: set 4 taps"
            )
        if len(out_channels) != NUM_TAPS:
            raise UserError(
                f"fapm out_channels {list(out_channels)} must list 4 widths (strides 4, 8, 16, 32)"
            )
        dim = adapter_dim or in_channels[-1]
        if int(dim * value_ratio) % num_heads:
            raise UserError(
                f"fapm num_heads {num_heads} does not divide the value width {int(dim * value_ratio)} "
                f"(adapter_dim {dim} x value_ratio {value_ratio}): pick a num_heads that does"
            )
        self.tap_norms = tap_norms(in_channels)
        self.tap_projections = nn.ModuleList(
            nn.Identity() if channels == dim else nn.Conv2d(channels, dim, 1) for channels in in_channels
        )
        self.adapter = Adapter(dim, conv_channels, num_heads, num_points, value_ratio, ffn_ratio)
        self.fapm = FidelityAwareProjection(dim, rank, tuple(out_channels))
        widths = list(out_channels)
        self.up_stages = nn.ModuleList(UpStage(widths[i], widths[i - 1], widths[i - 1]) for i in (3, 2, 1))
        full = max(1, widths[0] // 2)
        self.full_stages = nn.ModuleList([UpStage(widths[0], full, 0), UpStage(full, full, 0)])
        self.classifier = nn.Conv2d(full, num_classes, 1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        # Larger than 32x32 too: InstanceNorm cannot normalise a 1x1 stride-32 map while training.
        step = self.input_multiple
        if height % step or width % step or height * width < 2 * step * step:
            raise UserError(
                f"the fapm head needs sides that are multiples of 32 and an input larger than 32x32, "
                f"got {height}x{width}: resize or pad the input (e.g. crop_size 512)"
            )
        taps = [
            proj(norm(f))
            for proj, norm, f in zip(self.tap_projections, self.tap_norms, features, strict=True)
        ]
        s4, s8, s16, s32 = self.fapm(self.adapter(taps, image))
        x = s32
        for stage, skip in zip(self.up_stages, (s16, s8, s4), strict=True):
            x = stage(x, skip)
        for stage in self.full_stages:
            x = stage(x)
        return self.classifier(x)
