"""DPT (arXiv 2103.13413) for segmentation: DINOv3's DPT head (eval/depth/models/dpt_head.py, 6876159) with the
segmentation head of isl-org/DPT (`dpt/models.py`, DPTSegmentationModel)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, Width

DPT_WIDTHS = {1024: (256, 512, 1024, 1024), 768: (96, 192, 384, 768)}  # isl-org DPT: ViT-L and ViT-B


def resample(channels: int, from_stride: int, to_stride: int) -> nn.Module:
    """Move a map from one stride to another: transposed conv up (kernel = stride = factor), strided 3x3 conv
    down, or nothing. ViT taps (all stride 16) get DPT's ×4, ×2, identity and stride-2 conv; ConvNeXt stages
    already sit at 4/8/16/32 and pass through unchanged."""
    if from_stride == to_stride:
        return nn.Identity()
    if from_stride > to_stride:
        factor, remainder = divmod(from_stride, to_stride)
        if remainder:
            raise ValueError(f"cannot upsample from stride {from_stride} to {to_stride}")
        return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor)
    factor, remainder = divmod(to_stride, from_stride)
    if remainder:
        raise ValueError(f"cannot downsample from stride {from_stride} to {to_stride}")
    return nn.Conv2d(channels, channels, kernel_size=3, stride=factor, padding=1)


class PreActResidualUnit(nn.Module):
    """ReLU → conv 3x3 (no bias) → ReLU → conv 3x3 (no bias), plus the input (DINOv3's PreActResidualConvUnit
    without a norm, as its DPT head builds it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FusionBlock(nn.Module):
    """Deeper path + refined skip, refined again, resized (align_corners=True, as DPT) to the next level's size,
    or ×2 for the last block, then a 1x1 projection (bias). The deepest block has no skip and so no skip unit.
    Resizing to the next level's size, not by ×2, keeps odd patch grids aligned level to level."""

    def __init__(self, channels: int, has_skip: bool) -> None:
        super().__init__()
        self.skip_unit = PreActResidualUnit(channels) if has_skip else None
        self.output_unit = PreActResidualUnit(channels)
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: torch.Size | None = None) -> Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        resize = {"size": size} if size is not None else {"scale_factor": 2}
        x = F.interpolate(self.output_unit(x), **resize, mode="bilinear", align_corners=True)
        return self.projection(x)


class DPTHead(SegmentationHead):
    """Reassemble four taps to strides 4, 8, 16, 32 (1x1 conv with bias, then ×4 / ×2 transposed conv,
    identity, stride-2 conv), 3x3 conv (no bias) to `features`, fuse top-down (pre-activation residual units,
    no bias), a 3x3 projection conv + ReLU after fusion, then isl-org DPT's segmentation head: 3x3 conv (no
    bias) → BatchNorm → ReLU → Dropout(0.1) → 1x1 conv to classes, ×2 up to the image.

    Reassembly widths as isl-org DPT: ViT-L (1024) 256/512/1024/1024, ViT-B (768) 96/192/384/768, other widths
    D/8, D/4, D/2, D (ViT-S: 48/96/192/384). Our heads receive patch maps, not the cls token: DPT's readout is
    `ignore` (one of its three options; its default `project` adds a linear layer on [patch, cls]).
    """

    target_strides = (4, 8, 16, 32)

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        features: Width = 256,
        reassemble_channels: Sequence[Width] | None = None,
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if len(in_channels) != len(self.target_strides):
            raise UserError(f"head dpt needs 4 taps, got {len(in_channels)}: configure 4 backbone taps")
        if reassemble_channels is None:
            width = in_channels[-1]
            uniform = len(set(in_channels)) == 1 and len(set(strides)) == 1
            reassemble_channels = DPT_WIDTHS.get(width, tuple(width // 2**k for k in (3, 2, 1, 0))) if uniform \
                else tuple(in_channels)  # fmt: skip
        if len(reassemble_channels) != len(in_channels):
            raise UserError(
                f"head option reassemble_channels has {len(reassemble_channels)} widths: give 4, one per tap"
            )
        self.reassemble = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, width, kernel_size=1),
                resample(width, stride, target),
                nn.Conv2d(width, features, kernel_size=3, padding=1, bias=False),
            )
            for channels, width, stride, target in zip(
                in_channels, reassemble_channels, strides, self.target_strides, strict=True
            )
        )
        self.fusion = nn.ModuleList(
            FusionBlock(features, has_skip=level > 0) for level in range(len(in_channels))
        )
        self.project = nn.Sequential(nn.Conv2d(features, features, kernel_size=3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Conv2d(features, features, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(features),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(features, num_classes, kernel_size=1),
        )

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        levels = [reassemble(feature) for reassemble, feature in zip(self.reassemble, features, strict=True)]
        deepest_first = levels[::-1]
        next_sizes = [level.shape[-2:] for level in deepest_first[1:]] + [None]
        x = self.fusion[0](deepest_first[0], size=next_sizes[0])
        for block, level, size in zip(self.fusion[1:], deepest_first[1:], next_sizes[1:], strict=True):
            x = block(x, level, size)
        logits = self.classifier(self.project(x))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
