"""Metrics: dataset-level image metrics (`images`: mmseg's mIoU, top-k), depth metrics (`depth`) and 3D volume
metrics in mm (`volumes`: Dice, IoU, HD95, surface Dice).

The image metrics' names are importable from here, loaded on first use: they import torchmetrics (1.4 s, most
of it transformers through its text metrics), which `predict` and the volume metrics never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinov3ds.metrics.images import (
        ClassificationMetric,
        SegmentationMetric,
        dice_and_iou,
        format_per_class_table,
        write_per_class_csv,
    )

__all__ = ["ClassificationMetric", "SegmentationMetric", "dice_and_iou", "format_per_class_table", "write_per_class_csv"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dinov3ds.metrics.images"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
