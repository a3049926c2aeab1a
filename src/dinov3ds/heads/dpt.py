"""DPT's decoder (arXiv 2103.13413) as DINOv3 uses it for depth: reassemble, then fuse top-down."""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, tap_norms


def resample(channels: int, from_stride: int, to_stride: int) -> nn.Module:
    """Move a map from one stride to another: transposed conv up, strided 3×3 conv down, or nothing.

    With ViT taps (all stride 16) this gives DPT's ×4, ×2, identity and stride-2 conv; ConvNeXt stages
    already sit at 4/8/16/32 and pass through unchanged.
    """
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


class ResidualConvUnit(nn.Module):
    """ReLU-conv3×3-ReLU-conv3×3 plus the input: refines a fused map without changing its size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FusionBlock(nn.Module):
    """Adds a refined skip to the deeper path, refines the sum and doubles its resolution.

    The deepest block has no deeper path, so it gets no skip unit (an unused unit would hold parameters
    that never receive gradients).
    """

    def __init__(self, channels: int, has_deeper_path: bool) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels) if has_deeper_path else None
        self.output_unit = ResidualConvUnit(channels)
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, skip: Tensor, deeper: Tensor | None = None) -> Tensor:
        x = skip
        if deeper is not None:
            # A stride-32 level of an input that is a multiple of 16 only is rounded up by the strided
            # conv, so ×2 can overshoot the skip by one pixel: follow the skip's size.
            if deeper.shape[-2:] != skip.shape[-2:]:
                deeper = F.interpolate(deeper, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = deeper + self.skip_unit(skip)
        x = self.output_unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.projection(x)


class DPTHead(SegmentationHead):
    """Four taps resampled to strides 4, 8, 16, 32, fused top-down, then a small conv classifier.

    We receive patch maps only (the backbone drops the cls token before the head), so DPT's readout
    handling (ignore/add/project) has nothing to act on and is left out.
    """

    target_strides = (4, 8, 16, 32)

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        features: int = 256,
        reassemble_channels: Sequence[int] = (96, 192, 384, 768),
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if len(in_channels) != len(self.target_strides):
            raise UserError(f"head dpt needs 4 taps, got {len(in_channels)}: configure 4 backbone taps")
        if len(reassemble_channels) != len(in_channels):
            raise UserError(
                f"head option reassemble_channels has {len(reassemble_channels)} widths: give 4, one per tap"
            )
        self.norms = tap_norms(in_channels)
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
            FusionBlock(features, has_deeper_path=level < len(in_channels) - 1)
            for level in range(len(in_channels))
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(features, 128, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(128, num_classes, kernel_size=1),
        )

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        levels = [
            reassemble(norm(feature))
            for norm, reassemble, feature in zip(self.norms, self.reassemble, features, strict=True)
        ]
        x = None
        for block, level in zip(reversed(self.fusion), reversed(levels), strict=True):
            x = block(level, x)
        logits = self.classifier(x)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
