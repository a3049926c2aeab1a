"""`unet`: the seed's U-Net decoder (downstream-dinov3 `DinoV3_UNet`, b246721), as it is built there."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.heads.base import SegmentationHead


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias, "same" padding) - BatchNorm - ReLU: the seed's building block."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))  # fmt: skip


class UpConv(nn.Module):
    """Bilinear ×2, then conv 3x3 (no bias) - BN - ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class UNetHead(SegmentationHead):
    """Four taps t1..t4 (ViT: blocks 2, 5, 8, 11 of ViT-S/B), raw: the backbone's final LayerNorm and nothing
    learned before fusion. With D the tap width:

        up1(t3 + t4), up2(t2), up3(t1)            stride 8,  D/2 each
        up4(up1 + up2), up5(up3)                  stride 4,  D/4
        up6(up4 + up5)                            stride 2,  D/8
        up7                                       stride 1,  D/16
        concat with conv-BN-ReLU(image, D/16) → conv 3x3 to the classes

    2,377,081 / 9,502,705 / 16,891,201 trainable parameters with ViT-S / B / L and one class, as the seed.
    The seed takes ViT taps only (equal widths at stride 16); ConvNeXt stage maps (strides 4-32, widths
    growing) are first resized to stride 16 and projected 1x1 to the last stage's width, our adaptation.
    """

    def __init__(self, in_channels: list[int], strides: list[int], num_classes: int) -> None:
        super().__init__(in_channels, strides, num_classes)
        if len(in_channels) != 4:
            raise ValueError(f"the unet head fuses exactly 4 taps, got {len(in_channels)}")
        width = in_channels[-1]
        self.adapt = nn.ModuleList(
            nn.Identity() if channels == width else nn.Conv2d(channels, width, kernel_size=1)
            for channels in in_channels
        )
        self.up1, self.up2, self.up3 = (UpConv(width, width // 2) for _ in range(3))
        self.up4, self.up5 = UpConv(width // 2, width // 4), UpConv(width // 2, width // 4)
        self.up6 = UpConv(width // 4, width // 8)
        self.up7 = UpConv(width // 8, width // 16)
        self.image_branch = conv_bn_relu(3, width // 16)
        self.classifier = nn.Conv2d(width // 16 * 2, num_classes, kernel_size=3, padding=1)

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        grid = (image.shape[-2] // 16, image.shape[-1] // 16)
        t1, t2, t3, t4 = (
            adapt(
                f
                if tuple(f.shape[-2:]) == grid
                else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            )
            for adapt, f in zip(self.adapt, features, strict=True)
        )
        x = self.up4(self.up1(t3 + t4) + self.up2(t2))
        x = self.up7(self.up6(x + self.up5(self.up3(t1))))
        return self.classifier(torch.cat([x, self.image_branch(image)], dim=1))
