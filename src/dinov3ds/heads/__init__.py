"""Segmentation heads by name, and the one factory that builds them from a config.

Each head declares its options as keyword-only arguments annotated with their type and range;
`check_head_options` checks a config's options against that signature, so a typo or a value out of range
(`mlp_dim: 0`) fails at start-up, naming the key and its range, instead of deep in training.
"""

import inspect
import json
import logging
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import TypeAdapter, ValidationError

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, TokenSource
from dinov3ds.heads.dpt import DPTHead
from dinov3ds.heads.eomt import EoMTHead
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
    "eomt": EoMTHead,
}

logger = logging.getLogger("dinov3ds")

__all__ = ["HEADS", "SegmentationHead", "TokenSource", "build_head", "check_head_options", "describe_option",
           "head_class", "head_options"]


def head_class(name: str) -> type[SegmentationHead]:
    """The registered head class called `name`, or a one-line error listing the valid names."""
    if name not in HEADS:
        raise UserError(f"head '{name}' is unknown: choose one of {', '.join(sorted(HEADS))}")
    return HEADS[name]


def head_options(name: str) -> list[str]:
    """The option names a head accepts: its keyword-only constructor arguments."""
    parameters = inspect.signature(head_class(name).__init__).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def describe_option(annotation: Any) -> str:
    """An option's type and range in words, as its error line gives them: "an integer in [1, 16384] or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_option(arg) for arg in args)
    if origin is Annotated:
        bounds = {name: getattr(rule, name) for item in args[1:] for rule in getattr(item, "metadata", [item])
                  for name in ("ge", "gt", "le", "lt") if getattr(rule, name, None) is not None}  # fmt: skip
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}"
        high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})"
        return f"{describe_option(args[0])} in {low}, {high}"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple, Sequence):
        return f"a list, each {describe_option(args[0])}"
    names = {bool: "true or false", int: "an integer", float: "a number", type(None): "null"}
    return names[annotation]


def check_head_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` as head `name` takes them, or a one-line error: an unknown name (with the valid ones), or a value
    outside the type and range its signature declares (naming `head.options.<key>` and the range). Checked
    strictly, as YAML gives values: `true` is no count, "8" no width."""
    valid = head_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"head option(s) {', '.join(unknown)} unknown to head '{name}': "
            f"valid options are {', '.join(valid) or 'none'}"
        )
    hints = typing.get_type_hints(head_class(name).__init__, include_extras=True)
    checked = {}
    for key, value in options.items():
        try:
            checked[key] = TypeAdapter(hints[key]).validate_json(json.dumps(value, default=str), strict=True)
        except ValidationError:
            allowed = describe_option(hints[key])
            raise UserError(f"head.options.{key}={value!r} is outside its range: give {allowed}") from None
    return checked


def build_head(
    name: str, in_channels: list[int], strides: list[int], num_classes: int, tokens: TokenSource | None = None,
    **options,
) -> SegmentationHead:
    """Build the head called `name` for the given taps (and, for heads that read tokens, the ViT's
    `TokenSource`) and log how many parameters it will train."""
    options = check_head_options(name, options)
    cls = head_class(name)
    head = cls(in_channels, strides, num_classes, tokens, **options) if cls.reads_tokens else cls(in_channels, strides, num_classes, **options)
    logger.info("head %s: %s trainable parameters", name, f"{head.trainable_parameters():,}")
    return head
