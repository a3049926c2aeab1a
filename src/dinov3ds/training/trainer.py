"""Runs a training: builds the data, the model and the Lightning Trainer, fits, writes the report.

Launch (README has more):

    dinov3ds train --config configs/classification_imagenette.yaml
    torchrun --nproc_per_node 4 -m dinov3ds train --config configs/segmentation_ade20k.yaml trainer.devices=4

The LightningModule (`training.module`) owns the loss, metrics, optimizer and what a checkpoint holds;
devices, precision, logging and resuming are Lightning's.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from dinov3ds.config import Config, load_config, save_config
from dinov3ds.data.build import DataSplits, build_datasets
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import AtomicCheckpointIO, load_checkpoint_file
from dinov3ds.models.tasks import Classifier, Segmenter, backbone_from_config, input_multiple, place_model
from dinov3ds.training.feature_cache import cached_features
from dinov3ds.training.interrupt import GracefulInterrupt
from dinov3ds.training.module import TaskModule

logger = logging.getLogger("dinov3ds")


def _loader(dataset: Dataset, config: Config, *, batch_size: int, train: bool) -> DataLoader:
    workers = config.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,  # a last batch of 1 breaks BatchNorm
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Persistent workers keep their RNG across epochs, which a resumed run cannot reproduce.
        persistent_workers=workers > 0 and not config.trainer.deterministic,
    )


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)
    is_global_zero: bool = True  # False on the other ranks of a distributed run


def build_model(config: Config, class_names: list[str], backbone) -> Classifier | Segmenter:
    """The model for the config's task around an already loaded backbone."""
    model_class = Classifier if config.task == "classification" else Segmenter
    if config.task == "classification" and config.head.name != "linear":
        raise UserError(f"head '{config.head.name}' is a segmentation head; classification uses head.name: linear")
    return model_class(backbone, len(class_names), config, class_names)


class IntervalLossProgressBar(TQDMProgressBar):
    """The progress bar with the training loss read at logging intervals (`TaskModule.shown_loss`)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if getattr(pl_module, "shown_loss", None) is not None:
            metrics["loss"] = f"{pl_module.shown_loss:.4g}"
        return metrics


def build_trainer(config: Config, output_dir: Path, monitor: str) -> L.Trainer:
    section = config.trainer
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    # last.ckpt at every validation, for --resume. Not `save_last=True` on the callback above: Lightning (2.6)
    # then writes last.ckpt only when best.ckpt improves, so a resume would go back to the best epoch.
    # Listed after `checkpoint` so last.ckpt carries the best-so-far state it just updated.
    last = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    loggers = [
        CSVLogger(save_dir=str(output_dir), name="", version=""),
        TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version=""),
    ]
    distributed = section.strategy.startswith("ddp") or section.num_nodes > 1
    return L.Trainer(
        accelerator=section.accelerator,
        devices=section.devices,
        num_nodes=section.num_nodes,
        strategy=section.strategy,
        precision=section.precision,
        max_epochs=section.max_epochs if section.max_steps < 0 else None,
        max_steps=section.max_steps,
        val_check_interval=section.val_check_interval,
        check_val_every_n_epoch=section.check_val_every_n_epoch if section.val_check_interval is None else None,
        gradient_clip_val=section.gradient_clip_val,
        log_every_n_steps=section.log_every_n_steps,
        deterministic=section.deterministic,
        enable_progress_bar=section.progress_bar,
        sync_batchnorm=distributed,  # SyncBatchNorm only when there is more than one process
        num_sanity_val_steps=0,  # a sanity pass would consume RNG and break exact resume
        callbacks=[checkpoint, last, GracefulInterrupt(output_dir / "checkpoints" / "last.ckpt"),  # SIGINT/SIGTERM → last.ckpt
                   *([IntervalLossProgressBar()] if section.progress_bar else [])],
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(output_dir),
        enable_model_summary=False,
    )


def train(config: Config | str | Path, overrides: list[str] | None = None, *, resume: bool = False) -> TrainResult:
    """Train a head as the config says; returns where the checkpoints and final metrics are."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    output_dir = Path(config.output_dir)
    last = output_dir / "checkpoints" / "last.ckpt"
    if resume and not last.is_file():
        raise UserError(f"--resume: {last} does not exist; start without --resume")
    L.seed_everything(config.seed, workers=True, verbose=False)
    if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes
        _check_writable(output_dir)
        save_config(config, output_dir / "config.yaml")

    device = training_device(config)
    backbone = backbone_from_config(config, device)
    splits = build_datasets(config, backbone.mean, backbone.std, input_multiple(config, backbone))
    backbone.unfreeze_last_blocks(config.backbone.unfreeze_last_blocks)
    model = place_model(build_model(config, splits.class_names, backbone), device)
    if config.trainer.compile:
        size = config.data.image_size - config.data.image_size % backbone.input_multiple or backbone.input_multiple
        backbone.compile_blocks(torch.zeros(1, 3, size, size, dtype=backbone.dtype, device=device))
    logger.info("trainable parameters: %s", f"{sum(p.numel() for p in model.head.parameters()):,}")
    from_features = (
        config.task == "classification" and not config.data.augment and config.cache_features
        and config.backbone.unfreeze_last_blocks == 0  # features of a backbone that trains cannot be cached
    )  # fmt: skip
    if from_features:
        splits = DataSplits(
            cached_features(model, splits.train, config), cached_features(model, splits.val, config), splits.class_names
        )
    module = TaskModule(model, config, splits.class_names, from_features=from_features)
    eval_batch = config.data.eval_batch_size or (config.data.batch_size if config.task == "classification" else 1)
    trainer = build_trainer(config, output_dir, module.monitor)
    history = _metrics_history(output_dir, last) if resume and rank_zero_only.rank == 0 else []
    trainer.fit(
        module,
        _loader(splits.train, config, batch_size=config.data.batch_size, train=True),
        _loader(splits.val, config, batch_size=eval_batch, train=False),
        ckpt_path=str(last) if resume else None,
        weights_only=True,
    )
    result = TrainResult(output_dir, _existing(output_dir / "checkpoints" / "best.ckpt"), _existing(last))
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result.is_global_zero = trainer.is_global_zero
    if trainer.is_global_zero:
        _prepend_history(output_dir / "metrics.csv", history)
        from dinov3ds.training.reports import write_training_report

        write_training_report(module, splits, result)
    return result


def training_device(config: Config) -> torch.device:
    """The device this process will train on. The backbone is loaded there and cached features are computed
    there: before `fit` Lightning has moved nothing, and a feature pass on the CPU would waste the GPU."""
    section = config.trainer
    if section.accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    devices = section.devices
    if isinstance(devices, str) and "," in devices:
        devices = [int(part) for part in devices.split(",") if part.strip()]
    return torch.device("cuda", devices[local_rank] if isinstance(devices, list) else local_rank)


def _metrics_history(output_dir: Path, last: Path) -> list[dict]:
    """Rows of metrics.csv up to the checkpoint being resumed (Lightning's CSVLogger starts a new file)."""
    path = output_dir / "metrics.csv"
    if not path.is_file():
        return []
    step = int(load_checkpoint_file(last).get("global_step", 0))
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("step") and int(row["step"]) <= step]


def _prepend_history(path: Path, history: list[dict]) -> None:
    """Put the rows from before a resume back in front of the resumed run's rows (written atomically)."""
    if not history or not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows, columns = list(reader), list(reader.fieldnames or [])
    columns += [key for row in history for key in row if key not in columns]
    columns = list(dict.fromkeys(columns))
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history + rows)
    os.replace(temporary, path)


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output_dir {output_dir} is not writable ({error.strerror}); choose another output_dir") from None
