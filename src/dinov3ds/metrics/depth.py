"""Monocular depth metrics: the standard eight (Eigen et al. 2014; BTS / AdaBins / DINOv2's definitions).

Over the valid pixels of one image (ground truth g > 0 and <= max_depth, inside the Eigen crop when asked),
with the prediction p clamped to [min_depth, max_depth] as BTS and DINOv2 do:
RMSE = sqrt(mean((g - p)²)), RMSE log = sqrt(mean((ln g - ln p)²)), AbsRel = mean(|g - p| / g),
SqRel = mean((g - p)² / g), log10 = mean(|log10 g - log10 p|), δ<1.25^k = share of max(g/p, p/g) < 1.25^k.
Papers report the mean of the per-image values over the test set (`DepthMetric.compute`'s plain keys);
`all_<name>` pools every valid pixel of the set instead. Sums are float64 and sum-reduced, so DDP is exact.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

NAMES = ("RMSE", "RMSE_log", "AbsRel", "SqRel", "log10", "d1", "d2", "d3")
# Pixel sums each metric is built from (RMSE and RMSE log take a square root of their mean at the end).
_TERMS = ("sq", "sq_log", "abs_rel", "sq_rel", "log10", "d1", "d2", "d3")
EIGEN_CROP = (45, 471, 41, 601)  # rows, columns of NYU's 480x640 frame that Eigen et al. evaluate


def valid_mask(target: Tensor, max_depth: float, eigen_crop: bool = False) -> Tensor:
    """Pixels that count: depth known (> 0) and within max_depth; with `eigen_crop`, the Eigen box only
    (scaled to the target's size when it is not 480x640)."""
    valid = (target > 0) & (target <= max_depth) & torch.isfinite(target)
    if eigen_crop:
        height, width = target.shape[-2:]
        top, bottom, left, right = EIGEN_CROP
        box = torch.zeros_like(valid)
        box[..., round(top * height / 480) : round(bottom * height / 480), round(left * width / 640) : round(right * width / 640)] = True
        valid &= box
    return valid


def pixel_terms(prediction: Tensor, target: Tensor, valid: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """[len(_TERMS) + 1] float64 sums over the valid pixels of one image: the terms, then the pixel count."""
    g = target[valid].double()
    p = prediction[valid].double().clamp(min_depth, max_depth)
    ratio = torch.maximum(g / p, p / g)
    difference = g - p
    terms = [difference.square(), (g.log() - p.log()).square(), difference.abs() / g, difference.square() / g,
             (g.log10() - p.log10()).abs(), ratio < 1.25, ratio < 1.25**2, ratio < 1.25**3]  # fmt: skip
    return torch.stack([t.double().sum() for t in terms] + [torch.tensor(float(g.numel()), dtype=torch.float64)])


def metrics_from_terms(sums: Tensor) -> dict[str, float]:
    """The eight metrics from summed terms and their pixel count (NaN when no pixel was valid)."""
    count = float(sums[-1])
    if count == 0:
        return dict.fromkeys(NAMES, math.nan)
    means = (sums[:-1] / count).tolist()
    means[0], means[1] = math.sqrt(means[0]), math.sqrt(means[1])
    return dict(zip(NAMES, means))


def image_metrics(prediction: Tensor, target: Tensor, *, min_depth: float = 1e-3, max_depth: float = 10.0,
                  eigen_crop: bool = False) -> dict[str, float]:  # fmt: skip
    """The eight metrics of one depth map [H, W] against its ground truth (metres)."""
    valid = valid_mask(target, max_depth, eigen_crop)
    return metrics_from_terms(pixel_terms(prediction, target, valid, min_depth, max_depth))


class DepthMetric(Metric):
    """Per-image metrics averaged over the set (the papers' figures) and the pixel-pooled ones (`all_*`)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, min_depth: float, max_depth: float, eigen_crop: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_depth, self.max_depth, self.eigen_crop = min_depth, max_depth, eigen_crop
        self.add_state("image_sum", default=torch.zeros(len(NAMES), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixel_sum", default=torch.zeros(len(_TERMS) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("per_image", default=[], dist_reduce_fx="cat")  # [1, 8] rows, in validation order

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """`prediction` and `target` [B, H, W] (or [B, 1, H, W]) in metres, the same size."""
        prediction, target = prediction.reshape(target.shape[0], *target.shape[-2:]), target.reshape(target.shape[0], *target.shape[-2:])
        for one_prediction, one_target in zip(prediction, target):
            valid = valid_mask(one_target, self.max_depth, self.eigen_crop)
            sums = pixel_terms(one_prediction, one_target, valid, self.min_depth, self.max_depth)
            self.pixel_sum += sums.to(self.pixel_sum.device)
            values = metrics_from_terms(sums)
            row = torch.tensor([values[name] for name in NAMES], dtype=torch.float64, device=self.image_sum.device)
            self.per_image.append(row[None])
            if not math.isnan(values["RMSE"]):  # an image without a valid pixel scores nothing
                self.image_sum += row
                self.images += 1

    def compute(self) -> dict:
        count = int(self.images)
        result = {name: float(self.image_sum[i]) / count if count else math.nan for i, name in enumerate(NAMES)}
        result.update({f"all_{k}": v for k, v in metrics_from_terms(self.pixel_sum).items()})
        rows = self.per_image if isinstance(self.per_image, Tensor) else (torch.cat(self.per_image) if self.per_image else None)
        result["per_image"] = rows.cpu() if rows is not None else torch.zeros(0, len(NAMES), dtype=torch.float64)
        result["images"] = count
        return result


def write_per_image_csv(result: dict, path: Path, names: list[str] | None = None) -> None:
    """One row per image (its name when known, else its index) with the eight metrics."""
    rows = result["per_image"].tolist()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *NAMES])
        for index, row in enumerate(rows):
            writer.writerow([names[index] if names and index < len(names) else index, *(f"{v:.6f}" for v in row)])


def format_summary(result: dict) -> str:
    """The eight figures on one line, as papers print them (metres for RMSE; δ as fractions)."""
    return "  ".join(f"{name}={result[name]:.4f}" for name in NAMES if name in result)
