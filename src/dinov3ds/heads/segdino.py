"""SegDINO's decoder (arXiv 2509.00833): the smallest multi-layer head that still uses every tap."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead


class SegDINOHead(SegmentationHead):
    """Per tap a 1×1 conv (bias) then a 3×3 conv (no bias) to `hidden_channels`; all resized to the first
    tap's size, concatenated, 1×1 conv to classes, bilinear up to the image.

    No normalisation and no activation, as in the paper: the taps arrive LayerNorm-ed, and leaving out a
    tap BatchNorm keeps the paper's exact parameter count (ViT-S, 1 class: 2,213,793).
    """

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        projection_channels: Sequence[int] = (96, 192, 384, 768),
        hidden_channels: int = 128,
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if len(projection_channels) != len(in_channels):
            raise UserError(
                f"head option projection_channels has {len(projection_channels)} widths for "
                f"{len(in_channels)} taps: give one width per tap"
            )
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, width, kernel_size=1),
                nn.Conv2d(width, hidden_channels, kernel_size=3, padding=1, bias=False),
            )
            for channels, width in zip(in_channels, projection_channels, strict=True)
        )
        self.classifier = nn.Conv2d(hidden_channels * len(in_channels), num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        size = features[0].shape[-2:]
        maps = [
            F.interpolate(branch(feature), size=size, mode="bilinear", align_corners=False)
            for branch, feature in zip(self.branches, features, strict=True)
        ]
        logits = self.classifier(torch.cat(maps, dim=1))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
