"""DepthEstimator: a frozen DINOv3 backbone plus a depth head, metric depth in metres at the input size.

    depther = DepthEstimator.from_checkpoint("output/depth/checkpoints/best.ckpt")
    metres = depther.predict("room.jpg")  # [H, W] float32 at the image's own size

`head.name: linear` is DINOv2/3's linear depth probe (last 1 or 4 blocks; the CLS token beside each patch with
`head.cls_token: true` as DINOv2, without it as DINOv3's NYU protocol);
any segmentation head that reads patch maps (dpt, unet, segdino, ...) becomes a depth head by predicting the
bins as its classes, turned into metres at full resolution (`heads/depth.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3ds.config import Config
from dinov3ds.data.transforms import SegmentationEvalTransform
from dinov3ds.errors import UserError
from dinov3ds.heads import build_head, head_class
from dinov3ds.heads.depth import LinearDepthHead, bins_to_depth
from dinov3ds.models.backbones import Backbone
from dinov3ds.models.tasks import ImageInput, _as_pil, _frozen_context, _restore, _TaskModel


def check_depth_head(config: Config, source: str) -> None:
    """linear, or a registered head that reads patch maps and predicts per-pixel classes (not pmt, eomt)."""
    if config.head.name == "linear":
        if config.head.options:
            raise UserError(f"{source}: head.options {config.head.options} are unknown to the linear depth head; "
                            "it is set by head.last_blocks (1 or 4) and head.cls_token: remove head.options")  # fmt: skip
        return
    cls = head_class(config.head.name)
    if cls.mask_classification or cls.reads_tokens:
        raise UserError(f"{source}: head '{config.head.name}' predicts masks, not per-pixel bins; depth uses "
                        "head.name linear, dpt, unet, segdino, fapm, unet_sum or unet_adapter")  # fmt: skip


class DepthEstimator(_TaskModel):
    """Frozen backbone → depth head → bin logits at the input size → metres (bins weighted per pixel)."""

    def __init__(self, backbone: Backbone, num_classes: int, config: Config, class_names: list[str]):
        super().__init__(backbone, config, class_names)
        check_depth_head(config, "config")
        self.num_classes = 1
        depth = config.depth
        self.min_depth, self.max_depth, self.bins_norm = depth.min_depth, depth.max_depth, depth.bins_norm
        self.linear = config.head.name == "linear"
        self.cls_token = self.linear and config.head.cls_token
        if self.linear:
            if config.head.last_blocks > backbone.depth:
                raise UserError(f"head.last_blocks={config.head.last_blocks} but {backbone.spec.name} has {backbone.depth} blocks")
            self.layers = list(range(backbone.depth - config.head.last_blocks, backbone.depth))
            width = (2 if self.cls_token else 1) * sum(backbone.feature_channels(self.layers))
            self.head = LinearDepthHead(width, depth.bins)
        else:
            self.layers = backbone.resolve_layers(config.backbone.layers)
            self.head = build_head(config.head.name, backbone.feature_channels(self.layers),
                                   backbone.feature_strides(self.layers), depth.bins, **config.head.options)  # fmt: skip

    def features(self, images: Tensor) -> list[Tensor]:
        """One map per tap; with `head.cls_token` (linear probe) each patch map has its CLS token broadcast beside it."""
        with _frozen_context(self.backbone):
            taps = self.backbone.get_intermediate_layers(images, self.layers, norm=True)
            if not self.cls_token:
                return [patches.float() for patches, _ in taps]
            return [torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1).float() for patches, cls in taps]

    def forward(self, images: Tensor) -> Tensor:
        """Depth in metres [B, 1, H, W] at the batch's size (what the loss takes)."""
        return bins_to_depth(self.head(self.features(images), images), self.min_depth, self.max_depth, self.bins_norm)

    @torch.inference_mode()
    def predict_depth(self, images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Metres [B, H, W] at `size` (the ground truth's or the original image's); with inference.flip, the
        mean of the image and its mirror (depth is unchanged by a horizontal flip)."""
        images = images.to(self.device)
        depth = self(images)
        if self.config.inference.flip:
            depth = (depth + self(images.flip(-1)).flip(-1)) / 2
        if size is not None and tuple(depth.shape[-2:]) != tuple(size):
            depth = F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
        return depth[:, 0]

    def eval_transform(self) -> SegmentationEvalTransform:
        return SegmentationEvalTransform(self.config.data.eval_size, self.backbone.mean, self.backbone.std,
                                         multiple_of=self.input_multiple)  # fmt: skip

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> np.ndarray:
        """Depth in metres [H, W] (float32) at the image's own resolution."""
        pil = _as_pil(image)
        tensor, _ = self.eval_transform()(pil)
        return self.predict_depth(tensor[None], (pil.height, pil.width))[0].float().cpu().numpy()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", overrides: list[str] | None = None
    ) -> DepthEstimator:
        """Head from `path` on its verified backbone; `overrides` e.g. ["backbone.dtype=bfloat16"]."""
        return _restore(cls, path, device, "depth", overrides)
