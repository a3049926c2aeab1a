"""Plots with matplotlib's object API: training curves from a metrics.csv, confusion matrices.

Figures are built as `Figure` objects (no pyplot) so they render off-screen with Agg on headless training
machines and never touch the process-wide backend or leak open figures.
"""

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from dinov3ds.errors import UserError


def read_metric_series(metrics_csv: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Column → (x, y) for every non-empty cell; x is the step when logged, else the row number."""
    if not Path(metrics_csv).is_file():
        raise UserError(f"metrics file {metrics_csv} does not exist; point to the run's metrics.csv")
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(metrics_csv, newline="") as handle:
        for row_number, row in enumerate(csv.DictReader(handle)):
            x = float(row["step"]) if row.get("step") else float(row_number)
            for key, cell in row.items():
                if key in ("epoch", "step") or key is None or cell in (None, ""):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(x)
                    ys.append(value)
    return series


def plot_curves(metrics_csv: Path, out_png: Path, keys: list[str] | None = None) -> None:
    """Plot a Lightning CSVLogger metrics.csv: losses on the left, accuracy / mIoU on the right, vs step.

    Rows are sparse (each metric is logged on some rows only); empty cells are skipped. Without `keys`,
    every column except epoch, step and learning rates ("lr*", a different scale) is drawn; keys missing
    from the file are skipped. A panel without data says so instead of failing.
    """
    series = read_metric_series(metrics_csv)
    if keys is None:
        keys = [key for key in series if not key.startswith("lr")]
    keys = [key for key in keys if key in series]
    fig = Figure(figsize=(12, 4.5))
    loss_axis, metric_axis = fig.subplots(1, 2)
    for axis, title, chosen in (
        (loss_axis, "loss", [k for k in keys if "loss" in k]),
        (metric_axis, "accuracy / mIoU", [k for k in keys if "loss" not in k]),
    ):
        for key in chosen:
            xs, ys = series[key]
            axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        if chosen:
            axis.legend()
        else:
            axis.text(
                0.5,
                0.5,
                f"no data logged yet in {Path(metrics_csv).name}",
                ha="center",
                transform=axis.transAxes,
            )
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    save_figure(fig, out_png)


def plot_confusion_matrix(
    cm: np.ndarray | Tensor, class_names: list[str] | None, out_png: Path, normalize: bool = True
) -> None:
    """Draw a [K, K] confusion matrix (rows: truth, columns: prediction), row-normalised by default.

    Class names label the axes up to 40 classes and cell values are printed up to 15; beyond that
    (e.g. ADE20K's 150) the matrix is still drawn, without tick labels.
    """
    matrix = (
        cm.detach().cpu().double().numpy() if isinstance(cm, Tensor) else np.asarray(cm, dtype=np.float64)
    )
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"confusion matrix has shape {matrix.shape}; it must be square [K, K]")
    k = len(matrix)
    if class_names is not None and len(class_names) != k:
        raise UserError(
            f"{len(class_names)} class names for a {k}-class confusion matrix; pass one name per class"
        )
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    names = class_names if class_names is not None else [str(i) for i in range(k)]
    side = min(max(6.0, 0.45 * k + 2), 20.0)
    fig = Figure(figsize=(side, side))
    axis = fig.subplots()
    image = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if k <= 40:
        axis.set_xticks(range(k), names, rotation=45, ha="right")
        axis.set_yticks(range(k), names)
    else:
        axis.set_xticks([])
        axis.set_yticks([])
    if k <= 15:
        for (row, col), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalize else f"{value:g}"
            axis.text(
                col,
                row,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.5 * matrix.max() else "black",
            )
    axis.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    save_figure(fig, out_png)


def save_figure(fig: Figure, out_png: Path) -> None:
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
