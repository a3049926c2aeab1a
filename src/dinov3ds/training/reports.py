"""What a finished run leaves for a person to look at: curves, confusion matrix, per-class tables, grids."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinov3ds.data.transforms import denormalize
from dinov3ds.metrics import format_per_class_table, write_per_class_csv
from dinov3ds.metrics.depth import format_summary as format_depth_summary
from dinov3ds.metrics.depth import write_per_image_csv
from dinov3ds.viz import default_palette, plot_confusion_matrix, plot_curves, prediction_grid

logger = logging.getLogger("dinov3ds")


def _scalars(result: dict) -> dict:
    return {k: float(v) for k, v in result.items() if isinstance(v, float) or (torch.is_tensor(v) and v.numel() == 1)}


def metric_files(task: str, prefix: str = "val") -> list[str]:
    """The files `write_metrics` writes, so a command can claim them before it computes anything."""
    per_class = [f"{prefix}_per_class_accuracy.csv", f"{prefix}_confusion_matrix.png"] if task == "classification" \
        else [f"{prefix}_per_image_depth.csv"] if task == "depth" else [f"{prefix}_per_class_iou.csv"]  # fmt: skip
    return [f"{prefix}_metrics.json", *per_class]


def write_metrics(result: dict, class_names: list[str], task: str, output_dir: Path, prefix: str = "val") -> str:
    """Per-class table (printed and CSV) plus a JSON of the scalar metrics; returns the printed text."""
    output_dir.mkdir(parents=True, exist_ok=True)
    scalars = _scalars(result)
    if task == "depth":  # metres and fractions as papers print them, one row per image in the CSV
        (output_dir / f"{prefix}_metrics.json").write_text(json.dumps({**scalars, "images": result["images"]}, indent=2))
        write_per_image_csv(result, output_dir / f"{prefix}_per_image_depth.csv")
        return f"depth ({result['images']} images): {format_depth_summary(result)}"
    counted = {"images": result["images"]} if "images" in result else {}
    (output_dir / f"{prefix}_metrics.json").write_text(json.dumps({**scalars, **counted}, indent=2, allow_nan=True))
    if task == "classification":
        per_class = result["per_class_accuracy"].tolist()
        lines = [f"{name:>24s}  {100 * acc:6.2f}" for name, acc in zip(class_names, per_class) if not math.isnan(acc)]
        (output_dir / f"{prefix}_per_class_accuracy.csv").write_text(
            "class,accuracy\n" + "".join(f"{n},{100 * a:.2f}\n" for n, a in zip(class_names, per_class))
        )
        plot_confusion_matrix(result["confusion_matrix"], class_names, output_dir / f"{prefix}_confusion_matrix.png")
        table = "per-class accuracy (%):\n" + "\n".join(lines)
    else:
        write_per_class_csv(result, class_names, output_dir / f"{prefix}_per_class_iou.csv")
        table = format_per_class_table(result, class_names)
    summary = "  ".join(f"{k}={100 * v:.2f}" for k, v in scalars.items() if not math.isnan(v))
    return f"{table}\n{summary}" + (f"  ({result['images']} images)" if "images" in result else "")


@torch.inference_mode()
def write_prediction_grid(model, dataset, output_path: Path, count: int = 6) -> None:
    """Validation images next to predicted and ground-truth overlays."""
    images, predictions, targets = [], [], []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        labels = model.predict_labels(image[None], tuple(target.shape[-2:]))
        picture = denormalize(image, model.backbone.mean, model.backbone.std)
        picture = np.asarray(
            F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None].float(), size=target.shape[-2:])[0]
            .permute(1, 2, 0).byte()
        )  # fmt: skip
        images.append(picture)
        predictions.append(labels[0].cpu().numpy())
        targets.append(target.numpy())
    prediction_grid(images, predictions, targets, default_palette(model.num_classes), output_path)


def write_training_report(module, splits, result) -> None:
    """Curves from metrics.csv, and the last validation's per-class results and pictures."""
    output_dir = result.output_dir
    metrics_csv = output_dir / "metrics.csv"
    if metrics_csv.is_file():
        plot_curves(metrics_csv, output_dir / "curves.png")
    if module.last_validation:
        text = write_metrics(module.last_validation, splits.class_names, module.config.task, output_dir)
        logger.info("validation results:\n%s", text)
    if module.config.task == "segmentation" and not module.from_features:
        write_prediction_grid(module.model.eval(), splits.val, output_dir / "val_predictions.png")
