"""3D segmentation metrics per class and case, in millimetres: Dice, IoU, HD95 and surface Dice (NSD).

Definitions (those of MONAI's `compute_hausdorff_distance(percentile=95)` and `compute_surface_dice`, checked
against them and against brute force in tests/test_volume_metrics.py; computed here in float64, which MONAI's
float32 distances are not, with the empty cases below instead of MONAI's NaN/inf and warnings):

- surface of a mask: its voxels with a 6-connected neighbour outside it (the mask XOR its erosion);
- HD95: the larger of the two directed 95th percentiles of surface-to-surface distances (voxel centres,
  scaled by the spacing);
- NSD at tolerance τ: the surface voxels of either mask within τ mm of the other's surface, over all
  surface voxels of both.

A class absent from the prediction or the reference (CONVENTION below): HD95 and NSD as MONAI's functions
return them (MONAI 1.x, `compute_hausdorff_distance` / `compute_surface_dice`, checked against MONAI itself in
tests): HD95 is undefined (NaN) when either mask is empty, there being no surface to measure from; NSD is
undefined when both are empty and 0 when exactly one is. Dice and IoU as nnU-Net's evaluation: undefined when
both are empty, 0 when exactly one is (a missed structure, or one predicted where there is none). An
undefined value is left out of its mean, as MONAI's and nnU-Net's reductions do (`scored` counts the cases
each mean is over); a mean over no case is null in metrics.json and n/a in the table. A missed structure
therefore shows as Dice 0 and NSD 0, not as an HD95 of the volume's diagonal (357 mm on a 1 mm MNI head).
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
CONVENTION = ("absent classes: HD95 NaN when either mask is empty, NSD NaN when both are and 0 when one is (MONAI); "
              "Dice and IoU NaN when both are empty, 0 when one is (nnU-Net); NaN left out of the means")  # fmt: skip


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


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Dice, IoU, HD95 (mm) and NSD at `tolerance_mm` of two boolean masks of one shape."""
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    if not prediction.any() and not reference.any():
        return dict.fromkeys(METRICS, math.nan)
    if not prediction.any() or not reference.any():
        return {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "nsd": 0.0}
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


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values (None and NaN are undefined), None when there is none."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def summarise(cases: dict[str, dict[str, dict[str, float]]]) -> dict:
    """Mean over the cases where it is defined, per class and metric (`scored`: over how many), and the mean of
    those over the classes (`mean`)."""
    classes = next(iter(cases.values())).keys() if cases else []
    per_class = {name: {m: _mean([case[name][m] for case in cases.values()]) for m in METRICS} for name in classes}
    scored = {name: {m: sum(not math.isnan(case[name][m]) for case in cases.values()) for m in METRICS}
              for name in classes}  # fmt: skip
    overall = {m: _mean([values[m] for values in per_class.values()]) for m in METRICS} if per_class else {}
    return {"cases": len(cases), "per_class": per_class, "mean": overall, "scored": scored}


def write_reports(cases: dict[str, dict[str, dict[str, float]]], folder: Path, prefix: str = "",
                  tolerance_mm: float = 1.0) -> dict:  # fmt: skip
    """`<prefix>metrics.json` (means, definitions) and `<prefix>per_case.csv` (one row per case and class)."""
    summary = {**summarise(cases), "tolerance_mm": tolerance_mm,
               "definitions": f"see dinov3ds.metrics.volumes: HD95 and NSD on 6-connected surfaces in mm; {CONVENTION}"}
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


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_summary(summary: dict) -> str:
    """The per-class table; n/a where no case defines a metric (a class absent from every reference and prediction,
    or HD95 of a class never found)."""
    lines = [f"{'class':<16}{'Dice':>8}{'IoU':>8}{'HD95 mm':>10}{'NSD':>8}   ({summary['cases']} cases)"]
    for name, values in [*summary["per_class"].items(), *([("mean", summary["mean"])] if summary["mean"] else [])]:
        lines.append(f"{name:<16}{_cell(values['dice'], 8, 4)}{_cell(values['iou'], 8, 4)}{_cell(values['hd95'], 10, 3)}"
                     f"{_cell(values['nsd'], 8, 4)}")  # fmt: skip
    return "\n".join(lines)
