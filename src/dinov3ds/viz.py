"""Pictures: label colouring and overlays, DINO PCA maps, training curves, confusion matrices, PNG masks.

Figures are built with matplotlib's object API (`Figure`, no pyplot) so they render off-screen with Agg on
headless training machines and never touch the process-wide backend or leak open figures.
"""

import csv
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from dinov3ds.errors import UserError


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC palette [K, 3] uint8: deterministic, distinct for up to 2**24 ids, class 0 black."""
    ids = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def _palette_for(labels: np.ndarray, palette: np.ndarray | None, ignore_index: int) -> np.ndarray:
    if palette is not None:
        return np.asarray(palette, dtype=np.uint8)
    valid = labels[labels != ignore_index]
    return default_palette(int(valid.max()) + 1 if valid.size else 1)


def colorize(labels: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Map an H×W label map to H×W×3 uint8 colours (palette row per id); `ignore_index` is black."""
    labels = np.asarray(labels)
    palette = np.asarray(palette, dtype=np.uint8)
    valid = labels != ignore_index
    if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= len(palette)):
        raise UserError(
            f"label ids span {labels[valid].min()}..{labels[valid].max()} but the palette has {len(palette)} colours; "
            "pass a palette with one row per class"
        )
    colours = np.zeros((*labels.shape, 3), dtype=np.uint8)
    colours[valid] = palette[labels[valid]]
    return colours


def overlay(
    image: np.ndarray | Image.Image,
    labels: np.ndarray,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    *,
    skip_background: bool = True,
    ignore_index: int = 255,
) -> np.ndarray:
    """Blend label colours over an RGB image (H×W×3 uint8); ignored pixels and, if asked, class 0 stay clear."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = np.asarray(labels)
    if rgb.shape[:2] != labels.shape:
        raise UserError(
            f"image is {rgb.shape[:2]} but labels are {labels.shape}; resize the labels to the image"
        )
    colours = colorize(labels, _palette_for(labels, palette, ignore_index), ignore_index)
    painted = labels != ignore_index
    if skip_background:
        painted &= labels != 0
    blended = rgb.astype(np.float64)
    blended[painted] = (1 - alpha) * blended[painted] + alpha * colours[painted]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    # Percentiles, not min/max: a few outlier tokens (e.g. high-norm artefacts) would wash out the picture.
    low, high = np.percentile(values, [1, 99])
    if high <= low:
        return np.zeros_like(values, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _principal_components(tokens: Tensor, count: int) -> Tensor:
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:count].T


def pca_image(patches: Tensor, foreground_threshold: float | None = None) -> np.ndarray:
    """The classic DINO picture: the first three principal components of patch tokens as RGB.

    `patches` is [C, h, w] (returns h×w×3 uint8) or [B, C, h, w] (returns B×h×w×3, one PCA over the whole
    batch so colours mean the same in every image). With `foreground_threshold`, tokens whose first component
    (scaled to 0..1, oriented so the image border reads as background) is below it are black and the
    colours come from a PCA of the foreground tokens only, as in the DINOv2 demos.
    """
    single = patches.dim() == 3
    batch = patches.unsqueeze(0) if single else patches
    if batch.dim() != 4:
        raise UserError(f"patch tokens have shape {tuple(patches.shape)}; pass [C, h, w] or [B, C, h, w]")
    b, c, h, w = batch.shape
    tokens = batch.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, c)
    keep = torch.ones(len(tokens), dtype=torch.bool)
    if foreground_threshold is not None:
        first = _principal_components(tokens, 1)[:, 0].reshape(b, h, w)
        border = torch.cat(
            [
                first[:, 0].flatten(),
                first[:, -1].flatten(),
                first[:, :, 0].flatten(),
                first[:, :, -1].flatten(),
            ]
        )
        if border.mean() > first.mean():
            first = -first
        first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12)
        keep = first.flatten() >= foreground_threshold
    picture = np.zeros((len(tokens), 3), dtype=np.uint8)
    if keep.sum() > 1:
        components = _principal_components(tokens[keep], min(3, c, int(keep.sum()))).numpy()
        for channel in range(components.shape[1]):
            picture[keep.numpy(), channel] = _scale_to_uint8(components[:, channel])
    picture = picture.reshape(b, h, w, 3)
    return picture[0] if single else picture


def save_pca_image(
    patches: Tensor,
    path: Path,
    upscale_to: tuple[int, int] | None = None,
    foreground_threshold: float | None = None,
) -> None:
    """Write `pca_image` of one image's tokens [C, h, w] to `path`, optionally enlarged to (H, W).

    Enlarged with nearest-neighbour so each patch stays a visible square: the picture shows what the model
    sees, not a smoothed guess.
    """
    if patches.dim() == 4 and patches.shape[0] == 1:
        patches = patches[0]
    if patches.dim() != 3:
        raise UserError(
            f"save_pca_image takes one image's tokens [C, h, w], got {tuple(patches.shape)}; save each image"
        )
    picture = Image.fromarray(pca_image(patches, foreground_threshold))
    if upscale_to is not None:
        picture = picture.resize((upscale_to[1], upscale_to[0]), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def _read_metric_series(metrics_csv: Path) -> dict[str, tuple[list[float], list[float]]]:
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
    series = _read_metric_series(metrics_csv)
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
    _save(fig, out_png)


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
    _save(fig, out_png)


def prediction_grid(
    images: list[np.ndarray],
    predictions: list[np.ndarray],
    targets: list[np.ndarray] | None,
    palette: np.ndarray | None,
    out_png: Path,
    max_rows: int = 8,
) -> None:
    """One row per sample: image | prediction overlay | ground-truth overlay (when targets are given)."""
    if len(images) != len(predictions) or (targets is not None and len(targets) != len(images)):
        raise UserError("prediction_grid needs as many predictions (and targets) as images")
    rows = min(len(images), max_rows)
    if rows == 0:
        raise UserError("prediction_grid got no images; pass at least one")
    if palette is None:
        ids = [
            np.asarray(labels)
            for labels in predictions[:rows] + (targets[:rows] if targets is not None else [])
        ]
        palette = default_palette(max(int(labels[labels != 255].max(initial=0)) for labels in ids) + 1)
    columns = [("image", None), ("prediction", predictions)] + (
        [("ground truth", targets)] if targets is not None else []
    )
    fig = Figure(figsize=(4 * len(columns), 4 * rows))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for row in range(rows):
        for col, (title, labels) in enumerate(columns):
            picture = images[row] if labels is None else overlay(images[row], labels[row], palette)
            axes[row, col].imshow(picture)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    _save(fig, out_png)


def save_label_png(labels: np.ndarray, path: Path, num_classes: int | None = None) -> None:
    """Save class ids losslessly: 8-bit grey ('L') when they fit (K <= 256), else 16-bit."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0 or labels.min() < 0 or labels.max() > 65535:
        raise UserError(
            f"labels to save as PNG must be a 2-D map of ids in 0..65535, got shape {labels.shape}"
        )
    eight_bit = (
        num_classes if num_classes is not None else int(labels.max()) + 1
    ) <= 256 and labels.max() <= 255
    picture = (
        Image.fromarray(labels.astype(np.uint8)) if eight_bit else Image.fromarray(labels.astype(np.uint16))
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def save_color_png(
    labels: np.ndarray,
    path: Path,
    palette: np.ndarray | None = None,
    *,
    image: np.ndarray | Image.Image | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> None:
    """Save labels as colours, or as an overlay on `image` when one is given."""
    labels = np.asarray(labels)
    if image is None:
        picture = colorize(labels, _palette_for(labels, palette, ignore_index), ignore_index)
    else:
        picture = overlay(image, labels, palette, alpha, ignore_index=ignore_index)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def _save(fig: Figure, out_png: Path) -> None:
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
