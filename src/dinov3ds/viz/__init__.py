"""Pictures from arrays: label colours and overlays with a legend, gapless prediction grids, DINO PCA maps,
training curves, confusion matrices, label PNGs. Nothing here knows a model or a dataset.

`labels` colours label maps, `tiles` lays pictures out (text, legends, captions), `grids` composes
image | prediction | ground truth rows, `pca` the PCA picture, `plots` the matplotlib figures.
"""

from dinov3ds.viz.grids import prediction_grid
from dinov3ds.viz.labels import (
    colorize,
    default_palette,
    is_background,
    legend_entries,
    overlay,
    paints_class_zero,
    save_color_png,
    save_label_png,
)
from dinov3ds.viz.pca import pca_image, save_pca_image
from dinov3ds.viz.plots import plot_confusion_matrix, plot_curves, read_metric_series, save_figure
from dinov3ds.viz.tiles import caption, legend_strip, text_band, to_width

__all__ = [
    "caption", "colorize", "default_palette", "is_background", "legend_entries", "legend_strip", "overlay",
    "paints_class_zero", "pca_image", "plot_confusion_matrix", "plot_curves", "prediction_grid",
    "read_metric_series", "save_color_png", "save_figure", "save_label_png", "save_pca_image", "text_band",
    "to_width",
]  # fmt: skip
