"""Depth outputs: DINOv2/DINOv3's linear depth probe, and the bins → metres step every depth head ends with.

References: Meta's dinov3 `dinov3/eval/depth/models/__init__.py` (FeaturesToDepth, make_head; commit 3039bd3),
`dinov3/eval/depth/models/linear_head.py` (LinearHead, use_cls_token; commit 6876159) and DINOv2's
`dinov2/eval/depth/models/decode_heads/linear_head.py` (BNHead: CLS token concatenated to each patch, BatchNorm,
1x1 conv to 256 bins, ×4 up-sampling). The bins are linear between min and max depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bins_to_depth(logits: Tensor, min_depth: float, max_depth: float, norm: str = "softmax") -> Tensor:
    """[B, K, H, W] bin logits → [B, 1, H, W] metres: the bin centres (linspace(min, max, K)) weighted by the
    softmax of the logits, or (`linear`, Meta's default) by ReLU(logits) + 0.1 normalised to sum 1."""
    bins = torch.linspace(min_depth, max_depth, logits.shape[1], device=logits.device, dtype=torch.float32)
    logits = logits.float()
    if norm == "softmax":
        weights = logits.softmax(dim=1)
    else:
        weights = logits.relu() + 0.1
        weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", weights, bins)[:, None]


class LinearDepthHead(nn.Module):
    """Per tap, the patch map ([B, C, h, w]), or with `head.cls_token` (DINOv2) its CLS token broadcast beside it
    ([B, 2C, h, w]); the taps concatenated (`last_blocks` 1 or 4), BatchNorm, a 1x1 conv to the bins, ×4 bilinear
    up, then to the input size. `in_channels` is that concatenation's width (DepthEstimator assembles the maps)."""

    def __init__(self, in_channels: int, bins: int, upsample: int = 4) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, bins, kernel_size=1)
        self.upsample = upsample
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: list[Tensor], image: Tensor) -> Tensor:
        x = torch.cat(maps, dim=1)
        logits = self.classifier(self.norm(x))
        logits = F.interpolate(logits, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_step(self, step: int) -> None:
        """No schedule of its own (the interface segmentation heads share)."""
