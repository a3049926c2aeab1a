"""Rows of image | prediction | ground truth, touching, with captions and one legend of the classes shown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dinov3ds.errors import UserError
from dinov3ds.viz.labels import default_palette, legend_entries, overlay, paints_class_zero
from dinov3ds.viz.tiles import caption, legend_strip, text_band, to_width


def _tile_width(images: Sequence[np.ndarray]) -> int:
    """Small validation crops are enlarged (readable), large ones shrunk (a page, not a poster)."""
    return int(min(320, max(192, max(np.asarray(image).shape[1] for image in images))))


def prediction_grid(
    images: list[np.ndarray],
    predictions: list[np.ndarray],
    targets: list[np.ndarray] | None,
    palette: np.ndarray | None,
    out_png: Path,
    max_rows: int = 8,
    *,
    class_names: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    ignore_index: int = 255,
) -> None:
    """One row per sample: image | prediction overlay | ground-truth overlay (when targets are given), tiles
    touching, each row scaled to one width, an optional caption per row, and a legend of the classes shown."""
    if len(images) != len(predictions) or (targets is not None and len(targets) != len(images)):
        raise UserError("prediction_grid needs as many predictions (and targets) as images")
    rows = min(len(images), max_rows)
    if rows == 0:
        raise UserError("prediction_grid got no images; pass at least one")
    shown = [np.asarray(m) for m in predictions[:rows] + (targets[:rows] if targets is not None else [])]
    if palette is None:
        palette = default_palette(max(int(m[m != ignore_index].max(initial=0)) for m in shown) + 1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(palette))]
    skip = class_names is None or not paints_class_zero(class_names)
    columns = [predictions] + ([targets] if targets is not None else [])
    width = _tile_width(images[:rows])
    lines = []
    for row in range(rows):
        tiles = [to_width(np.asarray(images[row]), width, smooth=True)]
        for labels in columns:
            painted = overlay(images[row], labels[row], palette, skip_background=skip, ignore_index=ignore_index)
            tiles.append(to_width(painted, width))
        if captions is not None:
            tiles[0] = caption(tiles[0], captions[row])
        lines.append(np.concatenate(tiles, axis=1))
    titles = ["image", "prediction"] + (["ground truth"] if targets is not None else [])
    header = text_band(titles, [width] * len(titles))
    legend = legend_strip(legend_entries(names, palette, shown, ignore_index), width * len(titles))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([header, *lines, legend])).save(out_png)
