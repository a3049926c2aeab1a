"""Metrics: dataset-level image metrics (`images`: mmseg's mIoU, top-k) and 3D volume metrics in mm
(`volumes`: Dice, IoU, HD95, surface Dice).

The image metrics' names are importable from here; volume metrics from `dinov3ds.metrics.volumes`.
"""

from dinov3ds.metrics.images import (
    ClassificationMetric,
    SegmentationMetric,
    dice_and_iou,
    format_per_class_table,
    write_per_class_csv,
)

__all__ = ["ClassificationMetric", "SegmentationMetric", "dice_and_iou", "format_per_class_table", "write_per_class_csv"]
