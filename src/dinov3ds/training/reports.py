"""What a run leaves for a person to look at, during and after training: the metric files, the best and worst
validation pictures, run_info.json and the report page (`dinov3ds.report`), rebuilt as validations come.

`RunReport` is the Lightning callback: it logs the learning rate and each epoch's seconds (same CSV as the
metrics), and after a validation writes its metrics and rebuilds report.html, at most every REPORT_EVERY_S
seconds (and never for more than a tenth of the run's time); the end of the run always rebuilds it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F

from dinov3ds.data.transforms import denormalize
from dinov3ds.metrics import format_per_class_table, write_per_class_csv
from dinov3ds.metrics.depth import format_summary as format_depth_summary
from dinov3ds.metrics.depth import write_per_image_csv
from dinov3ds.models.finetune import trainable_counts
from dinov3ds.report import write_report
from dinov3ds.viz import default_palette, plot_confusion_matrix, prediction_grid

logger = logging.getLogger("dinov3ds")

REPORT_EVERY_S = 30.0  # mid-run rebuilds of report.html at most this often
PREDICTION_SAMPLES = 24  # validation images scored to pick the best and worst shown (evenly spaced over the split)


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


def _image_score(labels: np.ndarray, target: np.ndarray, ignore_index: int) -> float:
    """Mean IoU over the classes in the image's ground truth or prediction (ignored pixels left out)."""
    valid = target != ignore_index
    ious = [np.logical_and(labels == c, target == c)[valid].sum() / np.logical_or(labels == c, target == c)[valid].sum()
            for c in np.union1d(np.unique(labels[valid]), np.unique(target[valid]))]  # fmt: skip
    return float(np.mean(ious)) if ious else math.nan


@torch.inference_mode()
def write_prediction_grid(model, dataset, output_path: Path, count: int = 6, ignore_index: int = 255) -> None:
    """The best and worst of up to PREDICTION_SAMPLES validation images (evenly spaced over the split), by their
    own mIoU: image | prediction | ground truth, with their scores and the class legend."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(PREDICTION_SAMPLES, len(dataset))).round().astype(int))
    scored = []
    for index in picks.tolist():
        image, target = dataset[index]
        labels = model.predict_labels(image[None], tuple(target.shape[-2:]))[0].cpu().numpy()
        scored.append((_image_score(labels, target.numpy(), ignore_index), index, image, labels, target.numpy()))
    scored.sort(key=lambda item: -item[0] if not math.isnan(item[0]) else math.inf)  # best first, unscored last
    half = max(1, count // 2)
    if len(scored) <= count:
        chosen = [(f"#{item[1]}", item) for item in scored]
    else:
        chosen = [("best", item) for item in scored[:half]] + [("worst", item) for item in scored[-half:]]
    images, predictions, targets, captions = [], [], [], []
    for kind, (score, _, image, labels, target) in chosen:
        picture = denormalize(image, model.backbone.mean, model.backbone.std)
        picture = F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None].float(), size=target.shape[-2:])[0]
        images.append(np.asarray(picture.permute(1, 2, 0).byte()))
        predictions.append(labels)
        targets.append(target)
        captions.append(f"{kind}: mIoU {100 * score:.1f}%")
    prediction_grid(images, predictions, targets, default_palette(model.num_classes), output_path,
                    max_rows=len(chosen), class_names=model.class_names, captions=captions, ignore_index=ignore_index)  # fmt: skip


def write_run_info(module, output_dir: Path, state: str) -> None:
    """run_info.json: what the report shows beside the files (backbone identity, trainable counts, the best
    validation so far with its probe-grid head), written atomically."""
    backbone = module.model.backbone
    head, in_backbone = trainable_counts(backbone, sum(p.numel() for p in module.parameters() if p.requires_grad))
    info = {"state": state, "task": module.config.task, "monitor": module.monitor, "backbone": backbone.identity,
            "trainable": {"head": head, "backbone": in_backbone, "mode": module.config.backbone.finetune},
            "class_names": list(module.class_names), "best": module.best}  # fmt: skip
    temporary = output_dir / "run_info.json.tmp"
    temporary.write_text(json.dumps(info, indent=2, default=str, allow_nan=True))
    temporary.replace(output_dir / "run_info.json")


class RunReport(L.Callback):
    """Learning rate and epoch time into the logs; the metric files, run_info.json and report.html after
    validations (rank 0 only), so a run can be looked at while it trains."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.last_build = time.monotonic()
        self.build_seconds = 0.0
        self.epoch_start = time.monotonic()
        self.loss_sum: torch.Tensor | None = None
        self.batches = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_build = time.monotonic()
        if trainer.is_global_zero:
            write_run_info(pl_module, self.output_dir, "running")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.monotonic()
        self.loss_sum, self.batches = None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):  # summed on the device: read once per epoch, no host sync per step
            loss = loss.detach() / (len(pl_module.grid.heads) if pl_module.grid is not None else 1)
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One point per epoch, as nnU-Net's progress picture: mean training loss, learning rate, seconds."""
        if self.loss_sum is not None:
            pl_module.log("train/loss_epoch", float(self.loss_sum) / self.batches, on_step=False, on_epoch=True)
        if trainer.optimizers:
            pl_module.log("lr", float(trainer.optimizers[0].param_groups[0]["lr"]), on_step=False, on_epoch=True)
        pl_module.log("time/epoch_s", time.monotonic() - self.epoch_start, on_step=False, on_epoch=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        since = time.monotonic() - self.last_build
        if trainer.sanity_checking or not trainer.is_global_zero or since < max(REPORT_EVERY_S, 10 * self.build_seconds):
            return
        started = time.monotonic()
        for logger_ in trainer.loggers:
            logger_.save()  # the CSV rows so far, for the curves
        if pl_module.last_validation:
            write_metrics(pl_module.last_validation, list(pl_module.class_names), pl_module.config.task, self.output_dir)
        write_run_info(pl_module, self.output_dir, "running")
        write_report(self.output_dir, state="running")
        self.last_build = time.monotonic()
        self.build_seconds = self.last_build - started


def write_training_report(module, splits, result) -> None:
    """At the end of a run: the last validation's per-class results and pictures, run_info.json, report.html."""
    output_dir = result.output_dir
    if module.last_validation:
        text = write_metrics(module.last_validation, splits.class_names, module.config.task, output_dir)
        logger.info("validation results:\n%s", text)
    if module.config.task == "segmentation" and not module.from_features:
        write_prediction_grid(module.model.eval(), splits.val, output_dir / "val_predictions.png",
                              ignore_index=module.config.data.ignore_index)  # fmt: skip
    write_run_info(module, output_dir, "finished")
    report = write_report(output_dir, state="finished")
    logger.info("report: %s", report)

