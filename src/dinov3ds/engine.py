"""Training and evaluation with Lightning: one code path for CPU, one GPU, and many.

Launch (README has more):

    dinov3ds train --config configs/classification_imagenette.yaml
    torchrun --nproc_per_node 4 -m dinov3ds train --config configs/segmentation_ade20k.yaml trainer.devices=4

The LightningModule here owns the loss, metrics, optimizer and what a checkpoint holds; everything about
devices, precision, logging and resuming is Lightning's.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinov3ds import __version__
from dinov3ds.checkpoints import FORMAT_VERSION, AtomicCheckpointIO, load_checkpoint_file
from dinov3ds.config import Config, load_config, save_config
from dinov3ds.data.build import DataSplits, build_datasets
from dinov3ds.errors import UserError
from dinov3ds.feature_cache import cached_features
from dinov3ds.losses import build_loss
from dinov3ds.metrics import ClassificationMetric, SegmentationMetric
from dinov3ds.models import Classifier, LinearClassificationHead, Segmenter, backbone_from_config, place_model
from dinov3ds.signals import GracefulInterrupt

logger = logging.getLogger("dinov3ds")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float, cosine: bool) -> float:
    """Learning-rate multiplier: linear warm-up from 0, then cosine decay to `min_ratio` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict:
    """Generator states as tensors and ints only, so the checkpoint still loads with weights_only=True."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state.tolist()), gauss))


class TaskModule(L.LightningModule):
    """Loss, metrics, optimizer and checkpoint contents for a Classifier or a Segmenter."""

    def __init__(self, model: Classifier | Segmenter, config: Config, class_names: list[str], from_features: bool = False):
        super().__init__()
        self.model = model
        self.config = config
        self.class_names = class_names
        self.from_features = from_features  # batches are cached feature vectors, not images
        self.strict_loading = False  # checkpoints hold the head only; the backbone comes from its weight file
        self.num_classes = len(class_names)
        self.is_classification = config.task == "classification"
        if self.is_classification:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)
            self.val_metric = ClassificationMetric(self.num_classes, top_k=(1, min(5, self.num_classes)))
            self.monitor = "val/top1"
        else:
            loss = config.loss
            self.criterion = build_loss(
                loss.name, num_classes=self.num_classes, ignore_index=config.data.ignore_index,
                ce_weight=loss.ce_weight, dice_weight=loss.dice_weight, class_weights=loss.class_weights,
            )  # fmt: skip
            self.val_metric = SegmentationMetric(self.num_classes, ignore_index=config.data.ignore_index)
            self.monitor = "val/mIoU"
        self.grid = self._build_grid(config, model)
        self.last_validation: dict = {}
        self.shown_loss: float | None = None  # the loss read at the last logging interval
        self.register_buffer("nonfinite_loss", torch.zeros((), dtype=torch.bool), persistent=False)

    def _build_grid(self, config: Config, model) -> nn.ModuleList | None:
        """Learning-rate grid (DINOv3's linear evaluation): one linear head per rate, trained at once on the
        same features; `model.head` always holds a copy of the best so far, so checkpoints stay normal."""
        if not config.optim.lr_grid:
            return None
        if not self.is_classification:
            raise UserError("optim.lr_grid is for classification linear probes; remove it for segmentation")
        model.head.requires_grad_(False)
        heads = nn.ModuleList(LinearClassificationHead(model.feature_dim, self.num_classes, config.head.batchnorm)
                              for _ in config.optim.lr_grid)  # fmt: skip
        self.grid_metrics = nn.ModuleList(
            ClassificationMetric(self.num_classes, top_k=(1, min(5, self.num_classes))) for _ in heads
        )
        return heads

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model.head(inputs) if self.from_features else self.model(inputs)

    def _grid_logits(self, inputs: Tensor) -> list[Tensor]:
        features = inputs if self.from_features else self.model.features(inputs)
        return [head(features) for head in self.grid]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        inputs, target = batch
        if self.grid is not None:
            loss = sum(self.criterion(logits, target) for logits in self._grid_logits(inputs))
        else:
            loss = self.criterion(self(inputs), target)
        # Accumulate the check on the device and read it (and the loss shown in the progress bar) once per
        # logging interval: a per-step read is a host-device sync that stalls the GPU pipeline.
        self.nonfinite_loss |= ~torch.isfinite(loss.detach())
        if batch_index % self.config.trainer.log_every_n_steps == 0:
            self._stop_if_nonfinite()
            self.shown_loss = float(loss.detach())
        # Not prog_bar=True: Lightning converts progress-bar metrics to Python numbers after every batch.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def _stop_if_nonfinite(self) -> None:
        if bool(self.nonfinite_loss):
            raise UserError(
                f"training loss became NaN/Inf at step {self.global_step}; lower optim.lr or use precision 32 "
                f"(the last good checkpoint in {self.config.output_dir}/checkpoints is kept)"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> None:
        inputs, target = batch
        if self.grid is not None:
            for metric, logits in zip(self.grid_metrics, self._grid_logits(inputs)):
                metric.update(logits, target)
            return
        if self.is_classification:
            logits = self(inputs)
            self.log("val/loss", self.criterion(logits, target), on_epoch=True, sync_dist=True)
            self.val_metric.update(logits, target)
            return
        probabilities = self.model.predict_probabilities(inputs)
        probabilities = nn.functional.interpolate(probabilities.float(), size=target.shape[-2:], mode="bilinear")
        self.val_metric.update(probabilities.argmax(dim=1), target)

    def on_validation_epoch_start(self) -> None:
        self._stop_if_nonfinite()  # before ModelCheckpoint could save a broken head

    def _select_best_grid_head(self) -> dict:
        results = [metric.compute() for metric in self.grid_metrics]
        for metric in self.grid_metrics:
            metric.reset()
        best = max(range(len(results)), key=lambda i: results[i]["top1"])
        for lr, result in zip(self.config.optim.lr_grid, results):
            self.log(f"val/top1_lr{lr:g}", float(result["top1"]))
        self.log("val/best_lr", float(self.config.optim.lr_grid[best]))
        self.model.head.load_state_dict(self.grid[best].state_dict())
        return results[best]

    def on_validation_epoch_end(self) -> None:
        if self.grid is not None:
            result = self._select_best_grid_head()
        else:
            result = self.val_metric.compute()
            self.val_metric.reset()
        keys = ("top1", "top5", "mean_class_accuracy") if self.is_classification else ("mIoU", "aAcc", "mAcc", "mDice")
        for key in keys:
            if key in result and not (isinstance(result[key], float) and math.isnan(result[key])):
                self.log(f"val/{key}", float(result[key]), prog_bar=key in ("top1", "mIoU"))
        self.last_validation = result

    def configure_optimizers(self):
        optim = self.config.optim
        if self.grid is not None:
            parameters = [{"params": head.parameters(), "lr": lr} for head, lr in zip(self.grid, optim.lr_grid)]
        else:
            parameters = self._parameter_groups()
        if optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, total, optim.warmup_steps, optim.min_lr_ratio, optim.scheduler == "cosine"),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _parameter_groups(self) -> list[dict]:
        """The head at `lr`; unfrozen backbone blocks at `backbone_lr`, decayed by `layer_decay` per block
        towards the input (earlier layers hold more general features and should move less)."""
        optim = self.config.optim
        backbone_ids = {id(p) for p in self.model.backbone.parameters()}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids],
                   "lr": optim.lr}]  # fmt: skip
        blocks = self.model.backbone.blocks
        top_lr = optim.backbone_lr if optim.backbone_lr is not None else optim.lr / 10
        grouped: set[int] = set()
        for depth_from_top, block in enumerate(reversed(blocks)):
            trainable = [p for p in block.parameters() if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": top_lr * optim.layer_decay**depth_from_top})
                grouped |= {id(p) for p in trainable}
        rest = [p for p in self.model.backbone.parameters() if p.requires_grad and id(p) not in grouped]
        if rest:  # the final norm trains with the last block
            groups.append({"params": rest, "lr": top_lr})
        return groups

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the head, drop the frozen backbone, and record what is needed to rebuild and resume."""
        if any(not torch.isfinite(p).all() for p in self.parameters() if p.requires_grad):
            raise UserError(
                f"the head's weights became NaN/Inf at step {self.global_step}; lower optim.lr or use precision 32 "
                f"(the last good checkpoint in {self.config.output_dir}/checkpoints is kept)"
            )
        frozen = {name for name, p in self.model.backbone.named_parameters(prefix="model.backbone") if not p.requires_grad}
        frozen |= {name for name, _ in self.model.backbone.named_buffers(prefix="model.backbone")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["dinov3ds"] = {
            "format_version": FORMAT_VERSION,
            "dinov3ds_version": __version__,
            "task": self.config.task,
            "config": self.config.model_dump(mode="json"),
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "backbone": self.model.backbone.identity,
        }
        checkpoint["rng_states"] = _rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restored now, not in on_train_start: FitLoop.setup_data creates the resumed epoch's train-loader
        # iterator (which draws its seeds from the global RNG) before on_train_start, and nothing between here
        # and there draws random numbers. So a resumed run draws the same shuffles and augmentations as an
        # uninterrupted one (tests/test_cli_classification.py: resume after SIGKILL).
        if checkpoint.get("rng_states") is not None:
            _set_rng_state(checkpoint["rng_states"])


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
    splits = build_datasets(config, backbone.mean, backbone.std, _input_multiple(config, backbone))
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
        from dinov3ds.reports import write_training_report

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


def _input_multiple(config: Config, backbone) -> int:
    return 32 if config.task == "segmentation" and config.head.name == "fapm" else backbone.input_multiple


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
