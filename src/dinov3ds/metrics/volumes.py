"""3D segmentation metrics per class and case, in millimetres: Dice, IoU, HD95 and surface Dice (NSD).

Definitions (those of MONAI's `compute_hausdorff_distance(percentile=95)` and `compute_surface_dice`, checked
against them and against brute force in tests/test_volume_metrics.py; computed here in float64, which MONAI's
float32 distances are not, with the empty cases below instead of MONAI's NaN/inf and warnings):

- surface of a mask: its voxels with a 6-connected neighbour outside it (the mask XOR its erosion);
- HD95: the larger of the two directed 95th percentiles of surface-to-surface distances (voxel centres,
  scaled by the spacing);
- NSD at tolerance τ: the surface voxels of either mask within τ mm of the other's surface, over all
  surface voxels of both.

Empty masks, as Metrics Reloaded (Maier-Hein et al., Nat. Methods 2024) recommends, so every case counts in
the means instead of being dropped: prediction and reference both empty is a perfect result (Dice, IoU and
NSD 1, HD95 0); exactly one empty is the worst result (Dice, IoU and NSD 0, HD95 the volume's diagonal in mm,
the largest distance two voxels of it can have).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS = ("dice", "iou", "hd95", "nsd")


def surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _distances_to(target_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Every voxel's distance in mm to the nearest voxel of `target_surface` (exact Euclidean transform)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~target_surface, sampling=tuple(float(s) for s in spacing))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The mask's bounding box grown by one voxel (clamped to the volume), as slices."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    return tuple(box)


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Dice, IoU, HD95 (mm) and NSD at `tolerance_mm` of two boolean masks of one shape."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    if not prediction.any() and not reference.any():
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    if not prediction.any() or not reference.any():
        return {"dice": 0.0, "iou": 0.0, "hd95": diagonal_mm(prediction.shape, spacing), "nsd": 0.0}
    intersection = int(np.count_nonzero(prediction & reference))
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
    box = _bounding_box(prediction | reference)  # every surface voxel is inside: distances are unchanged
    surface_p, surface_r = surface(prediction[box]), surface(reference[box])
    p_to_r = _distances_to(surface_r, spacing)[surface_p]
    r_to_p = _distances_to(surface_p, spacing)[surface_r]
    hd95 = max(float(np.percentile(p_to_r, 95)), float(np.percentile(r_to_p, 95)))
    within = np.count_nonzero(p_to_r <= tolerance_mm) + np.count_nonzero(r_to_p <= tolerance_mm)
    return {"dice": 2 * intersection / total, "iou": intersection / (total - intersection), "hd95": hd95,
            "nsd": within / (len(p_to_r) + len(r_to_p))}  # fmt: skip


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                 tolerance_mm: float = 1.0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per foreground class (ids 1..K-1 of label maps): its binary metrics."""
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    return {name: binary_metrics(prediction == index, reference == index, spacing, tolerance_mm)
            for index, name in enumerate(class_names) if index > 0}  # fmt: skip


def summarise(cases: dict[str, dict[str, dict[str, float]]]) -> dict:
    """Mean over cases per class and metric, and the mean of those over the classes (`mean`)."""
    classes = next(iter(cases.values())).keys() if cases else []
    per_class = {name: {m: float(np.mean([case[name][m] for case in cases.values()])) for m in METRICS}
                 for name in classes}  # fmt: skip
    overall = {m: float(np.mean([values[m] for values in per_class.values()])) for m in METRICS} if per_class else {}
    return {"cases": len(cases), "per_class": per_class, "mean": overall}


def write_reports(cases: dict[str, dict[str, dict[str, float]]], folder: Path, prefix: str = "",
                  tolerance_mm: float = 1.0) -> dict:  # fmt: skip
    """`<prefix>metrics.json` (means, definitions) and `<prefix>per_case.csv` (one row per case and class)."""
    summary = {**summarise(cases), "tolerance_mm": tolerance_mm,
               "definitions": "see dinov3ds.metrics.volumes: HD95 and NSD on 6-connected surfaces in mm; "
                              "both masks empty = perfect, one empty = worst (Metrics Reloaded)"}  # fmt: skip
    rows = [[case, name, *(f"{values[m]:.6f}" for m in METRICS)] for case, per_class in sorted(cases.items())
            for name, values in per_class.items()]  # fmt: skip
    table = folder / f"{prefix}per_case.csv"
    temporary = table.with_name(table.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        csv.writer(handle).writerows([["case", "class", *METRICS], *rows])
    os.replace(temporary, table)
    report = folder / f"{prefix}metrics.json"
    temporary = report.with_name(report.name + ".tmp")
    temporary.write_text(json.dumps(summary, indent=2))
    os.replace(temporary, report)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'class':<16}{'Dice':>8}{'IoU':>8}{'HD95 mm':>10}{'NSD':>8}   ({summary['cases']} cases)"]
    for name, values in [*summary["per_class"].items(), *([("mean", summary["mean"])] if summary["mean"] else [])]:
        lines.append(f"{name:<16}{values['dice']:>8.4f}{values['iou']:>8.4f}{values['hd95']:>10.3f}{values['nsd']:>8.4f}")
    return "\n".join(lines)
