"""The `fapm` head: Dino U-Net (arXiv 2508.20909) on a frozen DINOv3 backbone, as its released code builds it
(yifangao112/DinoUNet `dinounet_training.py`, 8cb6c9f, with DINOv3's ViT-Adapter and nnU-Net 2D's settings).

1. DINOv3's ViT-Adapter without injector (`heads/vit_adapter.py`): 16 deformable heads, 4 points, value
   ratio 0.5, ConvFFN ratio 0.25 with DropPath 0.3, spatial-prior width 64, one extractor per tap plus two
   extra on the last, a BatchNorm per scale; maps at strides 4, 8, 16, 32 of the backbone's width.
2. FAPM per scale: shared and per-scale 1x1 to rank 256, FiLM of the per-scale branch by the shared one, a
   refinement (1x1, depthwise-separable 3x3 with its norm, 1x1, squeeze-and-excitation) down to 32 / 64 /
   128 / 256, plus a shortcut (identity where the widths agree). nnU-Net's InstanceNorm, LeakyReLU and conv
   biases throughout, as the released code passes them down.
3. Each map ×4 by a learnable transposed conv (strides 1, 2, 4, 8), then nnU-Net's 2D decoder from stride 8
   to full resolution (transposed conv, concat, two conv-IN-LeakyReLU) and a 1x1 classifier.

Trainable parameters with 2 classes: ViT-S 6,194,560, ViT-B 13,181,632, ViT-L 19,969,600: the released
code's 6,194,948 / 13,182,020 / 19,969,988 minus the two deep-supervision output layers that nnU-Net's
decoder builds and never uses when deep supervision is off (128→K and 64→K, 194·K parameters). The paper's
~5 / ~11 / ~18 M cannot be reproduced from the released code at any setting.

Designed for ViT taps (all at stride 16); taps of other widths or strides (ConvNeXt) are first projected to
the last tap's width with a 1x1 conv, our adaptation. Input sides must be multiples of 32.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import Rate, SegmentationHead, Width
from dinov3ds.heads.vit_adapter import NUM_TAPS, Adapter

# value and FFN widths relative to adapter_dim: at least one channel per 16
Ratio = Annotated[float, Field(ge=0.0625, le=16)]


def norm_act(channels: int) -> list[nn.Module]:
    """nnU-Net 2D's InstanceNorm (affine) and LeakyReLU, which the released code passes down to FAPM too."""
    return [nn.InstanceNorm2d(channels, affine=True), nn.LeakyReLU(0.01, inplace=True)]


class SqueezeExcitation(nn.Module):
    """Channel gating from global context (Hu et al., arXiv 1709.01507), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def refinement(rank: int, width: int) -> nn.Sequential:
    """1x1 down to `width`, norm + act, depthwise-separable 3x3 with its own norm + act, 1x1, SE."""
    return nn.Sequential(
        nn.Conv2d(rank, width, 1), *norm_act(width),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, width, 1), *norm_act(width),
        nn.Conv2d(width, width, 1), SqueezeExcitation(width),
    )  # fmt: skip


class FidelityAwareProjection(nn.Module):
    """FAPM: a shared and a per-scale 1x1 basis to `rank`; the shared branch gives FiLM's (gamma, beta) for the
    per-scale one; a refinement block down to the decoder's width plus a shortcut (1x1, or the identity where
    the widths agree)."""

    def __init__(self, dim: int, rank: int, out_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.shared = nn.Conv2d(dim, rank, 1)
        self.specific = nn.ModuleList(nn.Conv2d(dim, rank, 1) for _ in out_channels)
        self.film = nn.ModuleList(nn.Conv2d(rank, 2 * rank, 1) for _ in out_channels)
        self.refine = nn.ModuleList(refinement(rank, width) for width in out_channels)
        self.shortcut = nn.ModuleList(
            nn.Identity() if width == rank else nn.Conv2d(rank, width, 1) for width in out_channels
        )

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        outputs = []
        for i, x in enumerate(maps):
            gamma, beta = self.film[i](self.shared(x)).chunk(2, dim=1)
            z = gamma * self.specific[i](x) + beta
            outputs.append(self.refine[i](z) + self.shortcut[i](z))
        return outputs


class LearnableUpsample(nn.Module):
    """One ×2 transposed conv applied as often as it takes (the released `LearnableUpsampleBlock`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(channels, channels, 2, 2)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        while x.shape[-2] * 2 <= size[0] and x.shape[-1] * 2 <= size[1]:
            x = self.up2(x)
        return (
            x
            if tuple(x.shape[-2:]) == tuple(size)
            else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        )


def conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    """nnU-Net's block: conv 3x3 with bias, InstanceNorm (affine), LeakyReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), *norm_act(cout))


class UpStage(nn.Module):
    """nnU-Net decoder stage: transposed conv ×2 to the skip's width, concat the skip, two conv blocks."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.blocks = nn.Sequential(conv_norm_act(2 * cout, cout), conv_norm_act(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


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
        adapter_dim: Width | None = None,
        conv_channels: Width = 64,
        rank: Width = 256,
        out_channels: tuple[Width, ...] = (32, 64, 128, 256),
        num_heads: Annotated[int, Field(ge=1, le=256)] = 16,
        num_points: Annotated[int, Field(ge=1, le=64)] = 4,
        value_ratio: Ratio = 0.5,
        ffn_ratio: Ratio = 0.25,
        drop_path: Rate = 0.3,
        extra_extractors: Annotated[int, Field(ge=0, le=16)] = 2,
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
        self.tap_projections = nn.ModuleList(
            nn.Identity() if channels == dim else nn.Conv2d(channels, dim, 1) for channels in in_channels
        )
        self.adapter = Adapter(dim, conv_channels, num_heads, num_points, value_ratio, ffn_ratio, drop_path,
                               extra_extractors)  # fmt: skip
        self.fapm = FidelityAwareProjection(dim, rank, tuple(out_channels))
        self.upsample = nn.ModuleList(LearnableUpsample(width) for width in out_channels)
        widths = list(out_channels)
        self.up_stages = nn.ModuleList(UpStage(widths[i], widths[i - 1]) for i in (3, 2, 1))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        # Larger than 32x32 too: InstanceNorm cannot normalise a 1x1 stride-32 map while training.
        step = self.input_multiple
        if height % step or width % step or height * width < 2 * step * step:
            raise UserError(
                f"the fapm head needs sides that are multiples of 32 and an input larger than 32x32, "
                f"got {height}x{width}: resize or pad the input (e.g. crop_size 512)"
            )
        taps = [proj(f) for proj, f in zip(self.tap_projections, features, strict=True)]
        maps = self.fapm(self.adapter(taps, image))
        # Each FAPM map ×4 (strides 4-32 → 1-8), then the nnU-Net decoder from stride 8 to full resolution.
        s1, s2, s4, s8 = (
            up(m, (height // 2**i, width // 2**i))
            for i, (up, m) in enumerate(zip(self.upsample, maps, strict=True))
        )
        x = s8
        for stage, skip in zip(self.up_stages, (s4, s2, s1), strict=True):
            x = stage(x, skip)
        return self.classifier(x)
