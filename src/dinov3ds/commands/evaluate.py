"""`dinov3ds eval`: a checkpoint on its configured validation split, dataset-level metrics, per-class tables."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dinov3ds.commands.output_files import OutputFolder
from dinov3ds.data.build import build_validation_dataset
from dinov3ds.metrics import ClassificationMetric, SegmentationMetric
from dinov3ds.models.tasks import Classifier, load_model
from dinov3ds.training.reports import metric_files, write_metrics


def default_output_dir(checkpoint_path: str | Path) -> Path:
    """Beside the checkpoint (`checkpoints/best.ckpt` → `checkpoints/best_eval/`): nothing read from a file,
    such as the output_dir inside a checkpoint someone shared, decides where results are written."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_eval")


@torch.inference_mode()
def evaluate(checkpoint_path: str | Path, overrides: list[str] | None = None, output_dir: str | Path | None = None,
             overwrite: bool = False) -> dict:  # fmt: skip
    """Evaluate, print the per-class table and scalars, write them under `output_dir` (default: beside the
    checkpoint); files already there are kept unless `overwrite`."""
    model = load_model(checkpoint_path, overrides=overrides)
    config = model.config
    out = OutputFolder(Path(output_dir) if output_dir else default_output_dir(checkpoint_path), overwrite=overwrite)
    for name in metric_files(config.task, prefix="eval"):
        out.claim(name)
    val = build_validation_dataset(config, model.backbone.mean, model.backbone.std, model.input_multiple)
    if isinstance(model, Classifier):
        metric = ClassificationMetric(len(model.class_names), top_k=(1, min(5, len(model.class_names))))
        loader = DataLoader(val, batch_size=config.data.eval_batch_size or config.data.batch_size,
                            num_workers=config.data.num_workers)  # fmt: skip
        for images, target in tqdm(loader, desc="eval", disable=not config.trainer.progress_bar):
            metric.update(model(images), target)
    else:
        metric = SegmentationMetric(model.num_classes, ignore_index=config.data.ignore_index)
        loader = DataLoader(val, batch_size=config.data.eval_batch_size or 1, num_workers=config.data.num_workers)
        for images, target in tqdm(loader, desc="eval", disable=not config.trainer.progress_bar):
            metric.update(model.predict_labels(images, tuple(target.shape[-2:])), target)
    result = metric.compute()
    print(write_metrics(result, model.class_names, config.task, out.root, prefix="eval"))
    return result
