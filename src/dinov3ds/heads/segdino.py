"""SegDINO's decoder (arXiv 2509.00833): the smallest multi-layer head that still uses every tap."""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, Width


class SegDINOHead(SegmentationHead):
    """Per tap a 1×1 conv (bias) then a 3×3 conv (no bias) to `hidden_channels`; all resized to the first
    tap's size, concatenated, 1×1 conv to classes, bilinear up to the image (script-Yang/segdino `dpt.py`).

    No normalisation and no activation, as in the paper: the taps arrive LayerNorm-ed (ViT-S, 1 class:
    2,213,793 parameters). `variant: upstream` is the repository since e383124 ("Fix scale-related bug"): the
    first tap goes through a ×4 transposed conv (no bias) and the taps are fused at stride 4 (2,475,937).
    The paper's version is the default: it is the one the paper's numbers were measured with.
    """

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        projection_channels: Sequence[Width] = (96, 192, 384, 768),
        hidden_channels: Width = 128,
        variant: Literal["paper", "upstream"] = "paper",
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
        self.first_up = (nn.ConvTranspose2d(hidden_channels, hidden_channels, 4, stride=4, bias=False)
                         if variant == "upstream" else nn.Identity())  # fmt: skip
        self.classifier = nn.Conv2d(hidden_channels * len(in_channels), num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        first = self.first_up(self.branches[0](features[0]))
        size = first.shape[-2:]
        maps = [first] + [
            F.interpolate(branch(feature), size=size, mode="bilinear", align_corners=False)
            for branch, feature in zip(self.branches[1:], features[1:], strict=True)
        ]
        logits = self.classifier(torch.cat(maps, dim=1))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
