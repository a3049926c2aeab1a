"""DINOv3's linear segmentation probe: the yardstick for how much a frozen backbone already knows."""

import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.heads.base import Rate, SegmentationHead


class LinearHead(SegmentationHead):
    """Last tap only: Dropout2d(0.1) → BatchNorm → 1×1 conv at the tap's stride → bilinear up to the image.

    As Meta's `LinearHead` (dinov3 eval/segmentation/models/heads/linear_head.py, 6876159): the same order, the
    classifier initialised N(0, 0.01) with zero bias. Deliberately no spatial context and no earlier layers,
    so its mIoU is comparable with the paper's linear-probe numbers (ADE20K, ViT-S: 47.0).
    """

    def __init__(
        self, in_channels: list[int], strides: list[int], num_classes: int, *, dropout: Rate = 0.1
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        channels = in_channels[-1]
        self.dropout = nn.Dropout2d(dropout)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        logits = self.classifier(self.norm(self.dropout(features[-1])))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
