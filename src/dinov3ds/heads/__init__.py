"""Segmentation heads by name, and the one factory that builds them from a config.

Each head declares its options as keyword-only arguments; `build_head` checks a config's options against
that signature, so a typo fails at start-up with the list of valid names instead of deep in training.
"""

import inspect
import logging

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, TokenSource
from dinov3ds.heads.dpt import DPTHead
from dinov3ds.heads.fapm import FAPMHead
from dinov3ds.heads.linear import LinearHead
from dinov3ds.heads.pmt import PMTHead
from dinov3ds.heads.segdino import SegDINOHead
from dinov3ds.heads.unet import UNetHead
from dinov3ds.heads.unet_adapter import AdapterUNetHead
from dinov3ds.heads.unet_sum import SumUNetHead

HEADS: dict[str, type[SegmentationHead]] = {
    "linear": LinearHead,
    "segdino": SegDINOHead,
    "dpt": DPTHead,
    "unet": UNetHead,
    "unet_sum": SumUNetHead,
    "unet_adapter": AdapterUNetHead,
    "fapm": FAPMHead,
    "pmt": PMTHead,
}

logger = logging.getLogger("dinov3ds")

__all__ = ["HEADS", "SegmentationHead", "TokenSource", "build_head", "head_class", "head_options"]


def head_class(name: str) -> type[SegmentationHead]:
    """The registered head class called `name`, or a one-line error listing the valid names."""
    if name not in HEADS:
        raise UserError(f"head '{name}' is unknown: choose one of {', '.join(sorted(HEADS))}")
    return HEADS[name]


def head_options(name: str) -> list[str]:
    """The option names a head accepts: its keyword-only constructor arguments."""
    parameters = inspect.signature(head_class(name).__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_head(
    name: str, in_channels: list[int], strides: list[int], num_classes: int, tokens: TokenSource | None = None,
    **options,
) -> SegmentationHead:
    """Build the head called `name` for the given taps (and, for heads that read tokens, the ViT's
    `TokenSource`) and log how many parameters it will train."""
    valid = head_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"head option(s) {', '.join(unknown)} unknown to head '{name}': "
            f"valid options are {', '.join(valid) or 'none'}"
        )
    cls = head_class(name)
    head = cls(in_channels, strides, num_classes, tokens, **options) if cls.reads_tokens else cls(in_channels, strides, num_classes, **options)
    logger.info("head %s: %s trainable parameters", name, f"{head.trainable_parameters():,}")
    return head
