"""Runs a training: builds the data, the model and the Lightning Trainer, fits, writes the report.

Launch (README has more):

    dinov3ds train --config configs/classification_imagenette.yaml
    torchrun --nproc_per_node 4 -m dinov3ds train --config configs/segmentation_ade20k.yaml trainer.devices=4

The LightningModule (`training.module`) owns the loss, metrics, optimizer and what a checkpoint holds;
devices, precision, logging and resuming are Lightning's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from dinov3ds.config import Config, load_config, save_config
from dinov3ds.data.build import DataSplits, build_datasets, resolve_dataset_settings, segmentation_layout
from dinov3ds.data.sampling import ResumableSampler, SeededSamples
from dinov3ds.errors import UserError
from dinov3ds.heads import check_head_options
from dinov3ds.models.checkpoints import load_checkpoint_file, read_checkpoint
from dinov3ds.models.finetune import make_trainable, trainable_counts
from dinov3ds.models.hardware import check_devices, process_count
from dinov3ds.models.tasks import (
    TRAINED_SETTINGS,
    Classifier,
    Segmenter,
    backbone_from_config,
    check_head_name,
    input_multiple,
    model_class,
    place_model,
)
from dinov3ds.training.checkpoint_io import AtomicCheckpointIO
from dinov3ds.training.feature_cache import cached_features
from dinov3ds.training.interrupt import GracefulInterrupt
from dinov3ds.training.loggers import build_logger, check_loggers
from dinov3ds.training.module import TaskModule
from dinov3ds.training.probe_grid import input_config
from dinov3ds.training.reports import RunReport
from dinov3ds.training.run_folder import MetricsHistory, claim_run_folder

logger = logging.getLogger("dinov3ds")


def make_loader(dataset: Dataset, config: Config, *, batch_size: int, train: bool) -> DataLoader:
    """Order, augmentation seeds and the ranks' shards come from a `ResumableSampler` (not Lightning's
    DistributedSampler), so a resumed run, mid-epoch and with any number of workers, sees the same batches."""
    workers = config.data.num_workers
    sampler = ResumableSampler(len(dataset), config.seed, shuffle=train, even=train)
    return DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size,  # a last batch of 1 breaks BatchNorm
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # Its own generator: creating an iterator then draws no number from the global RNG (which the model's
        # dropout uses), so a resumed run, which creates one more, stays in step with an uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
    )


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict = field(default_factory=dict)  # the last validation's
    best: dict = field(default_factory=dict)  # score, epoch, step and metrics of the best validation
    is_global_zero: bool = True  # False on the other ranks of a distributed run


def build_model(config: Config, class_names: list[str], backbone) -> Classifier | Segmenter:
    """The model for the config's task around an already loaded backbone."""
    check_head_name(config, "config")
    if config.task == "classification":  # a probe grid's model computes the widest vector its heads read
        return Classifier(backbone, len(class_names), input_config(config), class_names)
    return model_class(config.task)(backbone, len(class_names), config, class_names)


class IntervalLossProgressBar(TQDMProgressBar):
    """The progress bar with the training loss read at logging intervals (`TaskModule.shown_loss`)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if getattr(pl_module, "shown_loss", None) is not None:
            metrics["loss"] = f"{pl_module.shown_loss:.4g}"
        return metrics


def build_trainer(config: Config, output_dir: Path, monitor: str, mode: str = "max") -> L.Trainer:
    section = config.trainer
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    # last.ckpt at every validation, for --resume. Not `save_last=True` on the callback above: Lightning (2.6)
    # then writes last.ckpt only when best.ckpt improves, so a resume would go back to the best epoch.
    # Listed after `checkpoint` so last.ckpt carries the best-so-far state it just updated.
    last = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip
    loggers = [build_logger(name, config, output_dir) for name in section.logger]
    distributed = (section.strategy.startswith("ddp") or section.num_nodes > 1
                   or process_count(section.accelerator, section.devices) > 1)  # `auto` on 2+ GPUs is DDP too
    try:
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
            use_distributed_sampler=False,  # ResumableSampler shards the data itself
            callbacks=[checkpoint, last, GracefulInterrupt(output_dir / "checkpoints" / "last.ckpt"),  # SIGINT/SIGTERM → last.ckpt
                       RunReport(output_dir), *([IntervalLossProgressBar()] if section.progress_bar else [])],
            logger=loggers,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(output_dir),
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError) as error:  # settings Lightning refuses (accelerator, strategy)
        raise UserError(f"trainer: {str(error).splitlines()[0]}; fix the trainer section") from None


# Settings a resumed run must share with the run it continues: they change what the head sees or is.
RESUME_SETTINGS = (*TRAINED_SETTINGS, "data.dataset", "data.image_size", "data.eval_size", "data.medical")


def train(config: Config | str | Path, overrides: list[str] | None = None, *, resume: bool | str | Path = False,
          overwrite: bool = False) -> TrainResult:  # fmt: skip
    """Train a head as the config says; returns where the checkpoints and final metrics are.

    `resume`: True continues from output_dir/checkpoints/last.ckpt, a path from that checkpoint. An output_dir
    that already holds a run is refused unless resuming it or `overwrite` (which removes that run's files).
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    check_before_start(config)
    resolve_dataset_settings(config)  # nnU-Net data: class names, modality and CT range, saved with the run
    config.data.root = str(Path(config.data.root).resolve())  # stored whole: eval finds it from any folder
    output_dir = Path(config.output_dir)
    _refuse_output_inside_the_data(config, output_dir)
    checkpoint = _resume_checkpoint(config, output_dir, resume) if resume else None
    if rank_zero_only.rank != 0:  # under DDP every rank runs this; rank 0 holds the folder and writes
        return _fit(config, output_dir, checkpoint)
    with claim_run_folder(output_dir, resume=checkpoint is not None, overwrite=overwrite):
        try:
            save_config(config, output_dir / "config.yaml")
            return _fit(config, output_dir, checkpoint)
        except OSError as error:  # a full disk or a folder gone read-only mid-run: loggers and reports write too
            where = error.filename or output_dir
            raise UserError(
                f"writing {where} failed: {error.strerror or error}; free disk space (or fix the folder), then "
                "continue with --resume: the checkpoints and metrics written before are kept"
            ) from None


def check_before_start(config: Config) -> None:
    """What the config alone decides, checked before any data, weights or files are touched: the head and its
    options (each against its range), and devices this machine has (no process is started for one it lacks)."""
    check_head_name(config, "config")
    if config.task == "segmentation" or (config.task == "depth" and config.head.name != "linear"):
        check_head_options(config.head.name, config.head.options)
    elif config.head.options:
        raise UserError(f"head.options {config.head.options} are for segmentation heads; classification's linear "
                        "head is set by head.pooling, head.last_blocks and head.batchnorm: remove head.options")  # fmt: skip
    check_devices(config.trainer.accelerator, config.trainer.devices)
    check_loggers(config.trainer.logger)


def _refuse_output_inside_the_data(config: Config, output_dir: Path) -> None:
    """An output_dir inside a split's folder would be read back as data (its pictures as images, its folders as
    classes) by the next run on that split: refused, naming both."""
    data = config.data
    root = Path(data.root)
    if data.dataset == "nnunet":
        folders = {"training": [root / "imagesTr", root / "labelsTr"]}
    elif config.task == "segmentation":
        layout, splits = segmentation_layout(config)
        folders = {name: [layout.image_folder(split), layout.mask_folder(split)]
                   for name, split in zip(("training", "validation"), splits)}  # fmt: skip
    else:
        folders = {"training": [root / data.train_split], "validation": [root / data.val_split]}
    target = output_dir.resolve()
    for name, paths in folders.items():
        for folder in paths:
            if target == folder.resolve() or folder.resolve() in target.parents:
                raise UserError(
                    f"output_dir {output_dir} is inside the {name} split's folder {folder}: the run's pictures and "
                    "files would be read as data by the next run; choose an output_dir outside the dataset"
                )


def _resume_checkpoint(config: Config, output_dir: Path, resume: bool | str | Path) -> Path:
    """The checkpoint to continue from, readable and made with the same settings, or a one-line refusal."""
    folder = output_dir / "checkpoints"
    path = folder / "last.ckpt" if resume is True else Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; start without --resume")
    try:
        stored = read_checkpoint(path)
    except UserError as error:
        readable = [p for p in sorted(folder.glob("*.ckpt"), key=lambda p: -p.stat().st_mtime) if p != path and _readable(p)]
        offer = f"; the newest readable checkpoint is {readable[0]}: --resume-from {readable[0]}" if readable else ""
        raise UserError(f"{error}{offer}") from None
    before, now = stored.run_config, config.model_dump(mode="json")
    for key in RESUME_SETTINGS:
        difference = _first_difference(_dotted(before, key), _dotted(now, key), key)
        if difference:
            changed, old, new = difference
            raise UserError(
                f"--resume: {changed} is {new!r} but the run in {path} was trained with {old!r}; use the same "
                "value to continue it, or train into a new output_dir"
            )
    return path


def _first_difference(old, new, key: str) -> tuple[str, object, object] | None:
    """The first dotted key below `key` whose value differs (a section compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in dict.fromkeys([*old, *new]):
            found = _first_difference(old.get(name), new.get(name), f"{key}.{name}")
            if found:
                return found
        return None
    return (key, old, new) if old != new else None


def _readable(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except UserError:
        return False
    return True


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _fit(config: Config, output_dir: Path, checkpoint: Path | None) -> TrainResult:
    L.seed_everything(config.seed, workers=True, verbose=False)
    device = training_device(config)
    backbone = backbone_from_config(config, device)
    splits = build_datasets(config, backbone.mean, backbone.std, input_multiple(config, backbone))
    backbone_training = make_trainable(backbone, config.backbone)
    model = place_model(build_model(config, splits.class_names, backbone), device)
    if config.trainer.compile:
        size = config.data.image_size - config.data.image_size % backbone.input_multiple or backbone.input_multiple
        backbone.compile_blocks(torch.zeros(1, 3, size, size, dtype=backbone.dtype, device=device))
    from_features = (
        config.task == "classification" and not config.data.augment and config.cache_features
        and config.backbone.finetune == "frozen"  # features of a backbone that trains cannot be cached
    )  # fmt: skip
    if config.cache_features and config.backbone.finetune != "frozen":
        logger.info("backbone.finetune=%s: features are not cached (the backbone trains)", config.backbone.finetune)
    if from_features:
        splits = DataSplits(
            cached_features(model, splits.train, config), cached_features(model, splits.val, config), splits.class_names
        )
    module = TaskModule(model, config, splits.class_names, from_features=from_features)
    # Counted on the module: a probe grid's heads and fine-tuned blocks train, the model's own head may not.
    head, in_backbone = trainable_counts(backbone, sum(p.numel() for p in module.parameters() if p.requires_grad))
    logger.info("trainable parameters: head %s, backbone %s (%s)", f"{head:,}", f"{in_backbone:,}", backbone_training)
    eval_batch = config.data.eval_batch_size or (config.data.batch_size if config.task == "classification" else 1)
    trainer = build_trainer(config, output_dir, module.monitor, module.task.monitor_mode)
    val_loader = make_loader(splits.val, config, batch_size=eval_batch, train=False)
    train_loader = make_loader(splits.train, config, batch_size=config.data.batch_size, train=True)
    module.train_sampler = train_loader.sampler
    resumed_step = int(load_checkpoint_file(checkpoint).get("global_step", 0)) if checkpoint else None
    history = MetricsHistory(output_dir, resumed_step) if trainer.is_global_zero else None
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(checkpoint) if checkpoint else None,
                    weights_only=True)  # fmt: skip
        if module.validated_step != trainer.global_step:
            _validate_the_final_step(trainer, module, val_loader, output_dir / "checkpoints")
    finally:
        if history is not None:
            history.merge_back()
    last = output_dir / "checkpoints" / "last.ckpt"
    result = TrainResult(output_dir, _existing(output_dir / "checkpoints" / "best.ckpt"), _existing(last))
    result.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result.best = dict(module.best)
    result.is_global_zero = trainer.is_global_zero
    if trainer.is_global_zero:
        from dinov3ds.training.reports import write_training_report

        write_training_report(module, splits, result)
    return result


def _validate_the_final_step(trainer: L.Trainer, module: TaskModule, loader: DataLoader, folder: Path) -> None:
    """A run whose last step fell between validations (max_steps before the first one, say) is validated and
    checkpointed once more, so it always ends with metrics, a last.ckpt and a best.ckpt."""
    logger.info("validating the final step %d", trainer.global_step)
    trainer.validate(module, dataloaders=loader, verbose=False)
    trainer.save_checkpoint(folder / "last.ckpt")
    if module.best["step"] == trainer.global_step:
        trainer.save_checkpoint(folder / "best.ckpt")


def training_device(config: Config) -> torch.device:
    """The device this process will train on. The backbone is loaded there and cached features are computed
    there: before `fit` Lightning has moved nothing, and a feature pass on the CPU would waste the GPU."""
    section = config.trainer
    if section.accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return torch.device("cpu")
    return process_device(section.devices)


def process_device(devices: int | str | list[int]) -> torch.device:
    """This process's GPU in a run over `devices` (Lightning's forms: a count, "auto", "0,2" or [0, 2]): the
    one at its LOCAL_RANK, which Lightning's launcher and torchrun set (0 in the launching process)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if isinstance(devices, str) and "," in devices:
        devices = [int(part) for part in devices.split(",") if part.strip()]
    return torch.device("cuda", devices[local_rank] if isinstance(devices, list) else local_rank)


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None
