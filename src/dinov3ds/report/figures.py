"""The report's pictures: the progress figure (as nnU-Net's progress.png), slice grids of volumes with their
labels, curves of several runs overlaid. Built with matplotlib's object API and `viz`, off-screen.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dinov3ds.viz import default_palette, prediction_grid, save_figure

MAIN_METRICS = ("val/mIoU", "val/top1", "val/RMSE", "val/Dice_foreground")  # the first one a run logged is its main metric


def read_metrics(metrics_csv: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Column → [(step, epoch, value)] over the rows where the column has a finite value."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    rows: list[dict] = []
    # A resumed run keeps its earlier rows aside (metrics.csv.previous) until it ends: read both, in order.
    for path in (Path(f"{metrics_csv}.previous"), Path(metrics_csv)):
        if path.is_file():
            with open(path, newline="") as handle:
                rows += list(csv.DictReader(handle))
    for number, row in enumerate(rows):
        step = float(row["step"]) if row.get("step") else float(number)
        epoch = float(row["epoch"]) if row.get("epoch") else math.nan
        for key, cell in row.items():
            if key in (None, "epoch", "step") or cell in (None, ""):
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            if math.isfinite(value):
                series.setdefault(key, []).append((step, epoch, value))
    return series


def main_metric(series: dict) -> str | None:
    return next((key for key in MAIN_METRICS if key in series), None)


def _per_epoch_mean(points: list[tuple[float, float, float]]) -> tuple[list[float], list[float]]:
    """Training loss as one point per epoch (its mean, at the epoch's last step): noise-free, as nnU-Net's."""
    epochs: dict[float, list[tuple[float, float]]] = {}
    for step, epoch, value in points:
        epochs.setdefault(epoch, []).append((step, value))
    xs = [max(s for s, _ in values) for values in epochs.values()]
    ys = [float(np.mean([v for _, v in values])) for values in epochs.values()]
    return xs, ys


def _draw(axis, points, label, style="-", colour=None) -> None:
    xs, ys = [p[0] for p in points], [p[-1] for p in points]
    axis.plot(xs, ys, style, color=colour, label=label, marker="o" if len(xs) < 30 else None, markersize=3)


def progress_figure(metrics_csv: Path, out_png: Path | BinaryIO) -> None:
    """Three panels against the optimizer step: train loss (per-epoch mean), val loss and the main metric (right
    axis); seconds per epoch; learning rate. A panel without data says so."""
    series = read_metrics(metrics_csv)
    fig = Figure(figsize=(11, 10))
    loss_axis, time_axis, lr_axis = fig.subplots(3, 1, sharex=True)
    if "train/loss_epoch" in series:
        _draw(loss_axis, series["train/loss_epoch"], "train loss (epoch mean)", colour="tab:blue")
    elif "train/loss" in series:
        xs, ys = _per_epoch_mean(series["train/loss"])
        loss_axis.plot(xs, ys, "-", color="tab:blue", label="train loss (epoch mean)", marker="o" if len(xs) < 30 else None, markersize=3)  # fmt: skip
    if "val/loss" in series:
        _draw(loss_axis, series["val/loss"], "val loss", colour="tab:red")
    loss_axis.set_ylabel("loss")
    metric = main_metric(series)
    handles, labels = loss_axis.get_legend_handles_labels()
    if metric:
        metric_axis = loss_axis.twinx()
        _draw(metric_axis, series[metric], metric, style="--", colour="tab:green")
        metric_axis.set_ylabel(metric)
        more = metric_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        loss_axis.legend(handles, labels, loc="best")
    for axis, key, ylabel in ((time_axis, "time/epoch_s", "seconds per epoch"), (lr_axis, "lr", "learning rate")):
        if key in series:
            _draw(axis, series[key], ylabel, colour="tab:purple" if key == "lr" else "tab:gray")
        else:
            axis.text(0.5, 0.5, f"{key} not logged yet", ha="center", transform=axis.transAxes)
        axis.set_ylabel(ylabel)
    if not series:
        loss_axis.text(0.5, 0.5, f"no data logged yet in {Path(metrics_csv).name}", ha="center", transform=loss_axis.transAxes)
    for axis in (loss_axis, time_axis, lr_axis):
        axis.grid(alpha=0.3)
    lr_axis.set_xlabel("step")
    fig.suptitle("progress")
    _save(fig, out_png)


def _train_loss(series: dict) -> str:
    return "train/loss_epoch" if "train/loss_epoch" in series else "train/loss"


def overlaid_curves(runs: dict[str, Path], out_png: Path | BinaryIO) -> None:
    """The runs' main metric, train loss and val loss, one colour per run."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    every = {name: read_metrics(path) for name, path in runs.items()}
    for axis, pick, title in ((axes[0], main_metric, "main metric"), (axes[1], _train_loss, "train loss"),
                              (axes[2], lambda s: "val/loss", "val loss")):  # fmt: skip
        drawn = False
        for index, (name, series) in enumerate(every.items()):
            key = pick(series)
            if key in series:
                _draw(axis, series[key], f"{name} ({key})", colour=f"C{index}")
                drawn = True
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", transform=axis.transAxes)
    _save(fig, out_png)


def _save(fig: Figure, out: Path | BinaryIO) -> None:
    if isinstance(out, (str, Path)):
        save_figure(fig, out)
    else:  # embedded in a page: nothing is written beside it
        fig.savefig(out, format="png", dpi=100, bbox_inches="tight")


def _to_rgb(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(np.rint(grey * 255).astype(np.uint8)[..., None], 3, axis=2)


def _plane(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    """One plane of a RAS volume, turned so superior (or anterior) is up."""
    return np.rot90(np.take(volume, index, axis=axis))


def _to_mm(plane: np.ndarray, axis: int, spacing: Sequence[float], smooth: bool) -> np.ndarray:
    """`plane` resampled so a pixel is as wide as it is tall in mm (anisotropic scans are not squashed)."""
    shown = [a for a in range(3) if a != axis]  # after rot90: rows along shown[1], columns along shown[0]
    finest = min(spacing)
    size = (max(1, round(plane.shape[1] * spacing[shown[0]] / finest)), max(1, round(plane.shape[0] * spacing[shown[1]] / finest)))
    if size == (plane.shape[1], plane.shape[0]):
        return plane
    picture = Image.fromarray(plane if plane.dtype == np.uint8 else plane.astype(np.int32))
    return np.asarray(picture.resize(size, Image.BILINEAR if smooth else Image.NEAREST)).astype(plane.dtype)


def volume_slices(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None, class_names: Sequence[str],
                  out_png: Path, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:  # fmt: skip
    """Axial, coronal and sagittal planes through the centre of the labelled structures (the volume's centre
    when there are none), in mm proportions: image | prediction | reference, with the class legend. Volumes are
    RAS (i, j, k) with voxel `spacing` in mm."""
    labelled = np.argwhere((reference if reference is not None else prediction) > 0)
    centre = labelled.mean(axis=0).round().astype(int) if len(labelled) else np.array(image.shape[:3]) // 2
    low, high = np.percentile(image, [1, 99])
    images, predicted, truths, captions = [], [], [], []
    for name, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        index = int(centre[axis])
        images.append(_to_mm(_to_rgb(_plane(image, index, axis), low, high), axis, spacing, smooth=True))
        predicted.append(_to_mm(_plane(prediction, index, axis).astype(np.int64), axis, spacing, smooth=False))
        if reference is not None:
            truths.append(_to_mm(_plane(reference, index, axis).astype(np.int64), axis, spacing, smooth=False))
        captions.append(f"{name} {index}")
    prediction_grid(images, predicted, truths if reference is not None else None, default_palette(len(class_names)),
                    out_png, class_names=class_names, captions=captions)  # fmt: skip
