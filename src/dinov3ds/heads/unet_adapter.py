"""`unet_adapter`: the seed's `DinoV3_UNetWithAdapter` (downstream-dinov3 b246721): DINOv3's ViT-Adapter with
plain 1x1 projections (no FAPM) into a U-Net decoder."""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import Rate, SegmentationHead, Width
from dinov3ds.heads.unet import conv_bn_relu
from dinov3ds.heads.vit_adapter import NUM_TAPS, Adapter


class DecoderBlock(nn.Module):
    """Transposed conv ×2 (bias), concat the skip, two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, 2)
        self.blocks = nn.Sequential(conv_bn_relu(out_channels + skip_channels, out_channels),
                                    conv_bn_relu(out_channels, out_channels))  # fmt: skip

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


class AdapterUNetHead(SegmentationHead):
    """Adapter maps f1..f4 (strides 4-32, the backbone's width D); f1, f2, f3 projected (1x1 no bias, BN,
    ReLU) to 256 / 128 / 64 channels; f4 through conv-BN-ReLU to 256 (the bottleneck); decoder 256 → 128 →
    64 → 32 joining f3, f2, f1 on the way up to stride 4; 1x1 to the classes, bilinear up to the image.

    Adapter as the seed configures it: 6 deformable heads (ViT-L's value width 512 is not a multiple of 6,
    so `num_heads: null` picks 8 there, our adaptation), 4 points, spatial-prior width 64, DropPath 0.3, two
    extra extractors. The seed resizes the logits with align_corners=True; here False, like every head.
    Input sides must be multiples of 32.
    """

    input_multiple = 32

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        *,
        decoder_channels: tuple[Width, ...] = (256, 128, 64, 32),
        num_heads: Annotated[int, Field(ge=1, le=256)] | None = None,
        conv_channels: Width = 64,
        drop_path: Rate = 0.3,
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if len(in_channels) != NUM_TAPS or len(decoder_channels) != NUM_TAPS:
            raise UserError(f"the unet_adapter head needs {NUM_TAPS} taps and 4 decoder_channels")
        dim = in_channels[-1]
        value_width = dim // 2
        heads = num_heads or (6 if value_width % 6 == 0 else 8)
        if value_width % heads:
            raise UserError(
                f"unet_adapter num_heads {heads} does not divide the value width {value_width}; pick one that does"
            )
        self.tap_projections = nn.ModuleList(
            nn.Identity() if channels == dim else nn.Conv2d(channels, dim, 1) for channels in in_channels
        )
        self.adapter = Adapter(dim, conv_channels, heads, 4, 0.5, 0.25, drop_path, 2)
        skip_widths = decoder_channels[:-1]  # f1, f2, f3
        self.projections = nn.ModuleList(
            nn.Identity() if width == dim else conv_bn_relu(dim, width, kernel_size=1)
            for width in skip_widths
        )
        self.bottleneck = conv_bn_relu(dim, decoder_channels[0])
        self.blocks = nn.ModuleList(
            DecoderBlock(decoder_channels[i], skip_widths[len(skip_widths) - 1 - i], decoder_channels[i + 1])
            for i in range(len(decoder_channels) - 1)
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, 1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        taps = [proj(f) for proj, f in zip(self.tap_projections, features, strict=True)]
        f1, f2, f3, f4 = self.adapter(taps, image)
        skips = [proj(f) for proj, f in zip(self.projections, (f1, f2, f3), strict=True)]
        x = self.bottleneck(f4)
        for block, skip in zip(self.blocks, reversed(skips), strict=True):
            x = block(x, skip)
        return F.interpolate(self.classifier(x), size=image.shape[-2:], mode="bilinear", align_corners=False)
