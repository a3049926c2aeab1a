"""`dinov3ds eval`: a checkpoint on its configured validation split, dataset-level metrics, per-class tables.

Evaluation runs through Lightning's `Trainer.validate` with the LightningModule training validates with, so
`trainer.devices=N` (or `trainer.num_nodes`) shards the split over N processes: each scores its own images
once (no padding), and the metric sums intersections, unions and confusion counts over the ranks before it
divides, so the numbers equal a one-process run's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from dinov3ds.commands.output_files import OutputFolder
from dinov3ds.config import Config
from dinov3ds.data.build import build_validation_dataset
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.tasks import checkpoint_config, load_model
from dinov3ds.training.module import TaskModule
from dinov3ds.training.reports import metric_files, write_metrics
from dinov3ds.training.trainer import make_loader, process_device


def default_output_dir(checkpoint_path: str | Path) -> Path:
    """Beside the checkpoint (`checkpoints/best.ckpt` → `checkpoints/best_eval/`): nothing read from a file,
    such as the output_dir inside a checkpoint someone shared, decides where results are written."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}_eval")


def _explicit_devices(devices: int | str | list[int]) -> bool:
    """Whether `trainer.devices` asks for a particular set of devices, not Lightning's "auto" (all GPUs)."""
    return not (devices == "auto" or devices == 1 or devices == "1")


def evaluation_placement(config: Config, device: torch.device) -> tuple[str, int | str | list[int], torch.device]:
    """(Lightning accelerator, devices, this process's device) for `--device` and the config's trainer section.

    One device unless `trainer.devices` names several (a checkpoint trained with the default "auto" evaluates
    on one GPU, not on every GPU of the machine); `--device cuda:N` picks which one.
    """
    devices = config.trainer.devices
    if device.type == "cpu":
        return "cpu", devices if _explicit_devices(devices) else 1, device
    if _explicit_devices(devices) or config.trainer.num_nodes > 1:
        return "gpu", devices, process_device(devices)
    return "gpu", [device.index], device


def evaluate(checkpoint_path: str | Path, overrides: list[str] | None = None, output_dir: str | Path | None = None,
             overwrite: bool = False, device: str | torch.device = "auto") -> dict:  # fmt: skip
    """Evaluate, print the per-class table and scalars, write them under `output_dir` (default: beside the
    checkpoint); files already there are kept unless `overwrite`. Returns the metrics (on every rank)."""
    out = OutputFolder(Path(output_dir) if output_dir else default_output_dir(checkpoint_path), overwrite=overwrite)
    config = checkpoint_config(read_checkpoint(checkpoint_path), checkpoint_path, overrides)
    # One writer per folder; under DDP every rank runs this and rank 0 alone holds the folder and writes.
    with out.held("--out") if rank_zero_only.rank == 0 else contextlib.nullcontext():
        if config.data.dataset == "nnunet":
            return evaluate_volumes(checkpoint_path, config, out, overrides, device)
        return evaluate_images(checkpoint_path, config, out, overrides, device)


def evaluate_images(checkpoint_path: str | Path, config: Config, out: OutputFolder, overrides: list[str] | None,
                    device: str | torch.device) -> dict:  # fmt: skip
    """A classification or segmentation checkpoint through `Trainer.validate` on its validation images."""
    for name in metric_files(config.task, prefix="eval"):
        out.claim(name)
    accelerator, devices, here = evaluation_placement(config, resolve_device(device))
    model = load_model(checkpoint_path, device=here, overrides=overrides)
    val = build_validation_dataset(config, model.backbone.mean, model.backbone.std, model.input_multiple)
    batch_size = config.data.eval_batch_size or (config.data.batch_size if config.task == "classification" else 1)
    loader = make_loader(val, config, batch_size=batch_size, train=False)
    module = TaskModule(model, config, model.class_names)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=config.trainer.num_nodes, strategy=config.trainer.strategy,
        precision="32-true",  # the backbone runs in its own dtype (backbone.dtype); heads and metrics in float32
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=config.trainer.progress_bar, use_distributed_sampler=False,  # the loader shards itself
    )  # fmt: skip
    trainer.validate(module, dataloaders=loader, verbose=False)
    result = module.last_validation
    if trainer.is_global_zero:
        with out.staged_files() as folder:
            text = write_metrics(result, model.class_names, config.task, folder, prefix="eval")
        print(text)
    return result


def evaluate_volumes(checkpoint_path: str | Path, config: Config, out: OutputFolder, overrides: list[str] | None,
                     device: str | torch.device) -> dict:  # fmt: skip
    """An nnU-Net / MSD checkpoint: every validation case predicted as a volume, per-class Dice, IoU, HD95 and
    surface Dice per case (`eval_per_case.csv`) and their means (`eval_metrics.json`)."""
    from dinov3ds.commands.volumes import slice_predictor
    from dinov3ds.data.nnunet import load_case, mask_ignored, read_nnunet
    from dinov3ds.metrics.volumes import case_metrics, format_summary, write_reports
    from dinov3ds.models.volume_inference import predict_volume

    for name in ("eval_metrics.json", "eval_per_case.csv"):
        out.claim(name)
    model = load_model(checkpoint_path, device=resolve_device(device), overrides=overrides)
    dataset = read_nnunet(config.data.root)
    _, val_cases = dataset.split(config.data.fold, config.data.val_fraction, config.seed)
    inference = config.inference
    cases = {}
    for case in val_cases:
        channels, label, reference = load_case(case, dataset)
        zooms = reference.header.get_zooms()[:3]
        labels, _ = predict_volume(
            channels, slice_predictor(model), options=config.data.medical, num_classes=model.num_classes,
            axes=inference.volume_axes or [inference.volume_axis], zooms=zooms, batch_size=inference.volume_batch_size,
            progress=config.trainer.progress_bar,
        )  # fmt: skip
        cases[case.case_id] = case_metrics(*mask_ignored(labels, label), zooms, model.class_names)
    with out.staged_files() as folder:
        summary = write_reports(cases, folder, prefix="eval_")
    print(format_summary(summary))
    return summary
