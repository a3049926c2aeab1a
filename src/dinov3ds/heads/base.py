"""The interface every segmentation head follows, so models, configs and tests treat heads alike."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field
from torch import Tensor, nn

from dinov3ds.errors import UserError

MAX_WIDTH = 16384  # channels of a head's own layers: four times ViT-7B's width
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Rate = Annotated[float, Field(ge=0, lt=1)]  # dropout and drop-path probabilities


@dataclass(frozen=True)
class TokenSource:
    """What a head that reads a ViT's token sequences (`reads_tokens`) needs from that ViT."""

    num_heads: int
    num_prefix_tokens: int  # CLS + registers, in front of the patch tokens
    rotate_half: bool  # the backbone's RoPE layout
    rope: Callable[[int, int], Tensor] | None  # patch grid (h, w) → the backbone's RoPE embedding
    blocks: tuple[nn.Module, ...] = ()  # the ViT's own blocks, input side first (eomt runs the last ones)
    norm: nn.Module | None = None  # the ViT's final norm


class SegmentationHead(nn.Module, ABC):
    """Turns backbone feature maps into per-pixel logits at the input resolution.

    Subclasses declare their options as keyword-only arguments with defaults, each annotated with its type and
    range (`Annotated[int, Field(ge=1, le=...)]`, `Width`, `Rate`); `build_head` reads them from the signature
    to validate a config, so a head never needs its own option parsing. A head whose
    layers need the image side to be a multiple of more than the backbone's patch size says so in
    `input_multiple` (as segmentation_models.pytorch encoders declare their divisibility).

    Args:
        in_channels: channels of each tapped feature map, shallowest first.
        strides: stride of each tapped map relative to the input image (16 for every ViT tap).
        num_classes: number of output channels (1 for binary segmentation with a sigmoid).
        **options: must be empty once a subclass has taken its own; anything left is a typo.
    """

    input_multiple: int = 1  # image sides must be multiples of this (and of the backbone's patch size)
    reads_tokens: bool = False  # features are token sequences [B, prefix + h*w, C], and a TokenSource is given
    mask_classification: bool = False  # training output is MaskPredictions for the mask-classification loss
    # Trailing backbone blocks the head runs itself (eomt, set per instance): its one feature is then the
    # un-normed token sequence that enters the first of them, and `TokenSource.blocks` are those blocks.
    backbone_blocks: int = 0

    def __init__(self, in_channels: list[int], strides: list[int], num_classes: int, **options) -> None:
        super().__init__()
        if options:
            raise UserError(
                f"head option(s) {sorted(options)} are unknown to {type(self).__name__}: remove them"
            )
        if num_classes < 1:
            raise UserError(f"num_classes is {num_classes}: set it to 1 or more")
        if len(in_channels) != len(strides):
            raise ValueError(f"{len(in_channels)} in_channels but {len(strides)} strides")
        self.in_channels = list(in_channels)
        self.strides = list(strides)
        self.num_classes = num_classes

    @abstractmethod
    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        """Map one NCHW tensor per tap (after the backbone's final LayerNorm) and the normalised image
        [B, 3, H, W] to logits [B, num_classes, H, W]."""

    def set_step(self, step: int) -> None:
        """Called before every training step, for heads with a schedule of their own (PMT's mask annealing)."""

    def trainable_parameters(self) -> int:
        """Count what the optimiser will update; printed at start-up so runs can be compared."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def tap_norms(in_channels: list[int]) -> nn.ModuleList:
    """One learned BatchNorm per tap: intermediate ViT layers only pass the final LayerNorm, whose affine
    was fitted to the last layer, so each tap needs its own rescaling (DINOv3 paper, appendix A.2)."""
    return nn.ModuleList(nn.BatchNorm2d(channels) for channels in in_channels)
