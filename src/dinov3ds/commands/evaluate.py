"""`dinov3ds eval`: a checkpoint on its configured validation split, dataset-level metrics, per-class tables.

Evaluation runs through Lightning's `Trainer.validate` with the LightningModule training validates with, so
`trainer.devices=N` (or `trainer.num_nodes`) shards the split over N processes: each scores its own images
once (no padding), and the metric sums intersections, unions and confusion counts over the ranks before it
divides, so the numbers equal a one-process run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from dinov3ds.commands.output_files import OutputFolder, staged
from dinov3ds.config import Config
from dinov3ds.data.build import build_validation_dataset
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.tasks import checkpoint_config, load_model
from dinov3ds.report import write_report
from dinov3ds.training.module import TaskModule
from dinov3ds.training.reports import metric_files, write_metrics, write_prediction_grid
from dinov3ds.training.trainer import make_loader, process_device

logger = logging.getLogger("dinov3ds")


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
    stored = read_checkpoint(checkpoint_path)
    config = checkpoint_config(stored, checkpoint_path, overrides)
    moved = data_root_here(config, stored.config, Path(checkpoint_path), overrides)
    if moved is not None:  # before any folder exists: a failure here leaves nothing behind
        overrides = [*(overrides or []), f"data.root={json.dumps(moved)}"]
        config = checkpoint_config(stored, checkpoint_path, overrides)
    # One writer per folder; under DDP every rank runs this and rank 0 alone holds the folder and writes.
    with out.held("--out") if rank_zero_only.rank == 0 else contextlib.nullcontext():
        if config.data.dataset == "nnunet":
            return evaluate_volumes(checkpoint_path, config, out, overrides, device)
        return evaluate_images(checkpoint_path, config, out, overrides, device)


def data_root_here(config: Config, stored: dict, checkpoint: Path, overrides: list[str] | None) -> str | None:
    """The checkpoint's data.root as seen from here. A relative root that does not exist from the current folder
    is looked for from the folder the run trained in (the run folder less its relative output_dir): found, it is
    used and said; else one line says where the root came from and how to pass it (not a download hint)."""
    root = Path(config.data.root)
    if root.exists():
        return None
    given = any(item.split("=", 1)[0].strip() == "data.root" for item in overrides or [])
    run_folder, output_dir = checkpoint.resolve().parent.parent, Path(str(stored.get("output_dir", "")))
    if not given and not root.is_absolute() and output_dir.parts and not output_dir.is_absolute() \
            and run_folder.parts[-len(output_dir.parts):] == output_dir.parts:  # fmt: skip
        trained_in = run_folder.parents[len(output_dir.parts) - 1]
        if (trained_in / root).exists():
            logger.info("data.root %s re-rooted to %s (relative to %s, where this run trained)", root,
                        trained_in / root, trained_in)  # fmt: skip
            return str(trained_in / root)
    source = "the data.root override" if given else f"{checkpoint}'s config"
    relative = "" if root.is_absolute() else f" (relative, read from {Path.cwd()})"
    raise UserError(f"data.root {root} from {source} does not exist{relative}; the run or its data moved: pass "
                    "data.root=/path/to/the/data after the checkpoint")  # fmt: skip


def evaluate_images(checkpoint_path: str | Path, config: Config, out: OutputFolder, overrides: list[str] | None,
                    device: str | torch.device) -> dict:  # fmt: skip
    """A classification or segmentation checkpoint through `Trainer.validate` on its validation images."""
    pictures = ["eval_predictions.png"] if config.task == "segmentation" else []
    for name in [*metric_files(config.task, prefix="eval"), *pictures, "eval_info.json", "report.html"]:
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
            if pictures:
                write_prediction_grid(model.eval(), val, folder / pictures[0], ignore_index=config.data.ignore_index)
            write_eval_info(folder, checkpoint_path, config, model)
        print(text)
        print(f"report: {write_eval_report(out)}")
    return result


def write_eval_info(folder: Path, checkpoint_path: str | Path, config: Config, model) -> None:
    """eval_info.json: what the eval report shows beside the metric files (and `dinov3ds report` rebuilds from)."""
    info = {"checkpoint": str(Path(checkpoint_path).resolve()), "task": config.task, "class_names": model.class_names,
            "backbone": model.backbone.identity, "config": config.model_dump(mode="json")}  # fmt: skip
    (folder / "eval_info.json").write_text(json.dumps(info, indent=2, default=str))


def write_eval_report(out: OutputFolder) -> Path:
    target = out.root / "report.html"
    with staged(target) as temporary:
        write_report(out.root, out=temporary)
    return target


def evaluate_volumes(checkpoint_path: str | Path, config: Config, out: OutputFolder, overrides: list[str] | None,
                     device: str | torch.device) -> dict:  # fmt: skip
    """An nnU-Net / MSD checkpoint: every validation case predicted as a volume, per-class Dice, IoU, HD95 and
    surface Dice per case (`eval_per_case.csv`) and their means (`eval_metrics.json`)."""
    from dinov3ds.commands.volumes import slice_predictor
    from dinov3ds.data.nnunet import load_case, mask_ignored, read_nnunet
    from dinov3ds.metrics.volumes import case_metrics, format_summary, write_reports
    from dinov3ds.models.volume_inference import predict_volume
    from dinov3ds.report.figures import volume_slices

    for name in ("eval_metrics.json", "eval_per_case.csv", "eval_slices.png", "eval_info.json", "report.html"):
        out.claim(name)
    model = load_model(checkpoint_path, device=resolve_device(device), overrides=overrides)
    dataset = read_nnunet(config.data.root)
    _, val_cases = dataset.split(config.data.fold, config.data.val_fraction, config.seed)
    inference = config.inference
    cases, worst = {}, None
    for case in val_cases:
        channels, label, reference = load_case(case, dataset)
        zooms = reference.header.get_zooms()[:3]
        labels, _ = predict_volume(
            channels, slice_predictor(model), options=config.data.medical, num_classes=model.num_classes,
            axes=inference.volume_axes or [inference.volume_axis], zooms=zooms, batch_size=inference.volume_batch_size,
            progress=config.trainer.progress_bar,
        )  # fmt: skip
        cases[case.case_id] = case_metrics(*mask_ignored(labels, label), zooms, model.class_names)
        dice = mean_dice(cases[case.case_id])
        if worst is None or dice < worst[0]:  # the worst case's volumes are kept for its slice picture
            worst = (dice, zooms, channels[0], labels, label)
    with out.staged_files() as folder:
        summary = write_reports(cases, folder, prefix="eval_")
        if worst is not None:
            _, spacing, image, labels, label = worst
            volume_slices(image, labels, label, model.class_names, folder / "eval_slices.png", spacing=spacing)
        write_eval_info(folder, checkpoint_path, config, model)
    print(format_summary(summary))
    print(f"report: {write_eval_report(out)}")
    return summary


def mean_dice(per_class: dict[str, dict[str, float]]) -> float:
    """A case's mean foreground Dice (classes where it is defined); the worst case is the lowest."""
    values = [v["dice"] for v in per_class.values() if not math.isnan(v["dice"])]
    return sum(values) / len(values) if values else math.inf
