"""Dataset-level segmentation and classification metrics.

Both metrics accumulate raw counts (areas, a confusion matrix) and divide only in `compute()`, so the result
is the metric over the whole dataset, never an average of per-batch scores. Every state is sum-reduced, which
makes DDP correct for free: torchmetrics adds the counts of all ranks before `compute()`.

Segmentation follows mmsegmentation's definition: per class, intersection I, union U, predicted area P and
label area L, summed over the dataset; IoU = I/U (NaN where U == 0), mIoU = nanmean(IoU), aAcc = ΣI/ΣL,
mAcc = nanmean(I/L) (classes absent from the labels are skipped, not counted as 0), Dice = 2I/(P+L).
Scores are fractions in [0, 1]; the table and CSV show percentages.
"""

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from dinov3ds.errors import UserError


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}; fix it in the config")


def _check_label_range(values: torch.Tensor, num_classes: int, what: str, fix: str) -> None:
    """Raise on out-of-range labels: bincount would otherwise miscount them silently."""
    invalid = (values < 0) | (values >= num_classes)
    if invalid.any():
        bad = int(values[invalid][0])
        raise UserError(f"{what} value {bad} is outside 0..{num_classes - 1}; {fix}")


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise division that gives NaN (undefined, skipped by nanmean) where the denominator is 0."""
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator, math.nan)


class SegmentationMetric(Metric):
    """mIoU / aAcc / mAcc / Dice over a whole dataset from integer label maps."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # int64 counts are exact at any dataset size; float32 would lose pixels beyond 2**24.
        for name in ("area_intersect", "area_union", "area_pred", "area_label"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predicted and true label maps ([B,H,W] or [H,W], same shape)."""
        if pred.shape != target.shape:
            raise UserError(
                f"prediction shape {tuple(pred.shape)} differs from mask shape {tuple(target.shape)}; "
                "resize predictions to the mask size before scoring"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise UserError(
                "SegmentationMetric needs integer label maps; take the argmax of the logits first"
            )
        self.images += target.shape[0] if target.ndim == 3 else 1
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        _check_label_range(
            target,
            self.num_classes,
            "mask",
            "fix the mask values or set num_classes / ignore_index in the config",
        )
        _check_label_range(
            pred, self.num_classes, "predicted label", "the model's num_classes must match the data"
        )

        k = self.num_classes
        intersect = torch.bincount(target[pred == target], minlength=k)
        area_pred = torch.bincount(pred, minlength=k)
        area_label = torch.bincount(target, minlength=k)
        self.area_intersect += intersect
        self.area_pred += area_pred
        self.area_label += area_label
        self.area_union += area_pred + area_label - intersect

    def compute(self) -> dict:
        """Scalars as Python floats (NaN where undefined); per-class entries as float64 tensors."""
        intersect, union = self.area_intersect, self.area_union
        iou = _safe_divide(intersect, union)
        acc = _safe_divide(intersect, self.area_label)
        dice = _safe_divide(2 * intersect, self.area_pred + self.area_label)
        in_labels = self.area_label > 0
        result = {
            "mIoU": torch.nanmean(iou).item(),
            # The same mean over only the classes in the ground truth: on data where few classes occur, mmseg's
            # mIoU also averages every class the model predicted somewhere it is absent (each IoU 0).
            "mIoU_gt": torch.nanmean(iou[in_labels]).item() if in_labels.any() else math.nan,
            "aAcc": _safe_divide(intersect.sum(), self.area_label.sum()).item(),
            "mAcc": torch.nanmean(acc).item(),
            "mDice": torch.nanmean(dice).item(),
            "IoU": iou,
            "Acc": acc,
            "Dice": dice,
            "images": int(self.images),  # scored over every rank: each image counted once
        }
        if self.num_classes == 2:
            result["Dice_foreground"] = dice[1].item()
        return result


def _per_class_rows(result: dict, class_names: list[str]) -> list[tuple[str, float, float, float]]:
    """(name, IoU %, Acc %, Dice %) per class, checking that the names match the metric."""
    num_classes = len(result["IoU"])
    if len(class_names) != num_classes:
        raise UserError(
            f"{len(class_names)} class names given for {num_classes} classes; list one name per class in the config"
        )
    columns = [[100 * float(v) for v in result[key]] for key in ("IoU", "Acc", "Dice")]
    return [(name, *values) for name, *values in zip(class_names, *columns, strict=True)]


def format_per_class_table(result: dict, class_names: list[str]) -> str:
    """An aligned text table of per-class IoU, Acc and Dice in percent for the classes that occur (in the labels
    or the predictions), then one line saying which mean is which. The CSV keeps every class."""
    rows = [row for row in _per_class_rows(result, class_names) if not math.isnan(row[1])]
    width = max(len("class"), *(len(row[0]) for row in rows)) if rows else len("class")
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'Dice':>7}"]
    lines += [f"{name:<{width}}  {iou:>7.2f}  {acc:>7.2f}  {dice:>7.2f}" for name, iou, acc, dice in rows]
    in_labels = int((~torch.isnan(result["Acc"])).sum())
    absent = len(class_names) - len(rows)
    lines.append(
        f"mIoU {100 * result['mIoU']:.2f} (mmseg: mean over the {len(rows)} classes in the labels or predictions); "
        f"mIoU_gt {100 * result['mIoU_gt']:.2f} (mean over the {in_labels} classes in the labels)"
        + (f"; {absent} classes in neither are not listed" if absent else "")
    )
    return "\n".join(lines)


def write_per_class_csv(result: dict, class_names: list[str], path: str | Path) -> None:
    """Write class,IoU,Acc,Dice (percent) to `path`, atomically so a crash never leaves half a file."""
    path = Path(path)
    rows = _per_class_rows(result, class_names)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "IoU", "Acc", "Dice"])
        writer.writerows([name, f"{iou:.4f}", f"{acc:.4f}", f"{dice:.4f}"] for name, iou, acc, dice in rows)
    os.replace(tmp, path)


class ClassificationMetric(Metric):
    """Top-k accuracy, per-class accuracy and a confusion matrix over a whole dataset."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, top_k: tuple[int, ...] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        if not top_k or any(k < 1 for k in top_k):
            raise UserError(f"top_k must be positive integers, got {top_k!r}; use e.g. (1, 5)")
        self.num_classes = num_classes
        self.top_k = tuple(top_k)
        self.add_state(
            "confusion_matrix",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "correct_top_k", default=torch.zeros(len(self.top_k), dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of logits [B,K] and true class indices [B]."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or target.shape != logits.shape[:1]:
            raise UserError(
                f"expected logits [B,{self.num_classes}] and targets [B], got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}; num_classes in the config must match the model"
            )
        target = target.long()
        _check_label_range(
            target, self.num_classes, "class label", "fix the labels or num_classes in the config"
        )
        k = self.num_classes
        pred = logits.argmax(dim=1)
        self.confusion_matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        # k larger than the number of classes means "any class", i.e. always correct.
        ranked = logits.topk(min(max(self.top_k), k), dim=1).indices
        hits = ranked == target[:, None]
        for i, top in enumerate(self.top_k):
            self.correct_top_k[i] += hits[:, :top].any(dim=1).sum()

    def compute(self) -> dict:
        """top{k} and mean_class_accuracy as Python floats; per-class accuracy NaN for a class with no samples."""
        matrix = self.confusion_matrix
        per_class = _safe_divide(matrix.diagonal(), matrix.sum(dim=1))
        total = matrix.sum()
        result = {
            f"top{k}": _safe_divide(self.correct_top_k[i], total).item() for i, k in enumerate(self.top_k)
        }
        result["per_class_accuracy"] = per_class
        result["mean_class_accuracy"] = torch.nanmean(per_class).item()
        result["confusion_matrix"] = matrix.clone()
        result["images"] = int(total)
        return result


def dice_and_iou(prediction: np.ndarray, label: np.ndarray, foreground: int = 1) -> dict[str, float]:
    """Dice and IoU of one foreground id. Both masks empty counts as a perfect 1.0 (nothing to find, none found)."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {prediction.shape} != label shape {label.shape}")
    predicted, actual = prediction == foreground, label == foreground
    intersection = int(np.count_nonzero(predicted & actual))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(actual))
    if total == 0:
        return {"dice": 1.0, "iou": 1.0}
    return {"dice": 2 * intersection / total, "iou": intersection / (total - intersection)}
