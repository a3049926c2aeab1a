"""`dinov3ds predict`: images, folders and NIfTI volumes through a trained checkpoint, results on disk; images
also through an exported `.onnx` file (onnxruntime), with the same outputs and summaries."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dinov3ds.commands.output_files import (
    OutputFolder,
    ParallelWriter,
    input_root,
    mirrored,
    printable,
    staged,
    written,
)
from dinov3ds.commands.volume_info import announce_volumes
from dinov3ds.commands.volumes import predict_volumes, volume_inputs
from dinov3ds.data.dicom import is_dicom_series
from dinov3ds.data.image_batches import image_batches, regular_file
from dinov3ds.data.io import IMAGE_EXTENSIONS, find_images
from dinov3ds.data.transforms import SegmentationEvalTransform
from dinov3ds.data.volumes import is_nifti
from dinov3ds.deploy.metadata import label_offset as dataset_label_offset
from dinov3ds.deploy.serving import is_onnx, load_onnx
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.hardware import usable_cores
from dinov3ds.models.inference import budget_slices, labels_at_size
from dinov3ds.models.tasks import Classifier, Segmenter, load_model
from dinov3ds.viz import default_palette, save_color_png, save_label_png


def _input_name(path: Path) -> bool:
    return is_nifti(path) or path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(paths: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """Split the command line into images, NIfTI files and DICOM series folders; folders are searched. A
    FIFO, device or socket with an input's name is refused (`regular_file`): reading one can block forever."""
    images, volumes, series = [], [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path} does not exist; pass image files, folders, .nii/.nii.gz volumes or DICOM folders")
        if path.is_dir():
            entries = sorted(path.rglob("*"))
            for entry in entries:
                if _input_name(entry) and entry.exists() and not entry.is_dir():
                    regular_file(entry)
            series += [folder for folder in [path, *(p for p in entries if p.is_dir())] if is_dicom_series(folder)]
            volumes += [p for p in entries if p.is_file() and is_nifti(p)]
            images += find_images(path)
            continue
        regular_file(path)
        if is_nifti(path):
            volumes.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            raise UserError(f"{path}: unsupported file type; use {', '.join(sorted(IMAGE_EXTENSIONS))}, .nii/.nii.gz or a DICOM folder")
    if not images and not volumes and not series:
        raise UserError(f"no images, volumes or DICOM series found in {', '.join(paths)}")
    return images, volumes, series


def _workers(model: Classifier | Segmenter) -> int:
    """Decoding processes, from the cores this process may use, never more than `data.num_workers` (0: decode
    here, between forwards). A GPU's forward leaves the CPU free: every core but the one feeding it. On a CPU
    the forward's threads hold their cores, and a worker there stalls every thread's barrier while it decodes:
    workers only take the cores torch's threads leave (SMT siblings, a lower `torch.set_num_threads`). On a
    2-core EPYC decoding between forwards kept 0.94-0.99 of the forward-only rate, one worker 0.88-0.93."""
    cores = usable_cores()
    spare = cores - 1 if model.device.type == "cuda" else cores - torch.get_num_threads()
    return max(0, min(model.config.data.num_workers, spare))


def classify_files(model: Classifier, images: list[Path], topk: int) -> list[dict]:
    """Top-k rows for image files, in their order: decoded in workers, `inference.batch_size` per forward."""
    loader = image_batches(images, model.eval_transform(), model.config.inference.batch_size,
                           workers=_workers(model), pin_memory=model.device.type == "cuda")  # fmt: skip
    results: list[dict] = [{} for _ in images]
    for batch, _, indices in loader:
        for index, row in zip(indices.tolist(), model.top_labels(batch, topk)):
            results[index] = {"image": str(images[index]), **row}
    return results


def predict_classification(model: Classifier, images: list[Path], out: OutputFolder, topk: int) -> list[dict]:
    jsonl, table = out.claim("predictions.jsonl"), out.claim("predictions.csv")
    results = classify_files(model, images, topk)
    with written(jsonl) as handle:
        for row in results:
            handle.write(json.dumps(row) + "\n")
    # surrogateescape: a file name that is not UTF-8 is written back as its own bytes, never a crash
    with written(table, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "probability", "top_labels", "top_probabilities"])
        for row in results:
            writer.writerow([row["image"], row["labels"][0], f"{row['probabilities'][0]:.6f}",
                             "|".join(row["labels"]), "|".join(f"{p:.6f}" for p in row["probabilities"])])  # fmt: skip
    if len(results) == 1:
        row = results[0]
        for label, probability in zip(row["labels"], row["probabilities"]):
            print(f"{probability:8.4f}  {label}")
    else:  # each image's --topk labels on its line
        for row in results:
            ranked = ", ".join(f"{label} {probability:.4f}" for label, probability in zip(row["labels"], row["probabilities"]))
            print(f"{printable(row['image'])}: {ranked}")
    print(f"wrote {jsonl} and {table} ({len(results)} images)")
    return results


def default_label_offset(model: Segmenter) -> int:
    """Label PNGs in the dataset's own convention (`deploy.metadata.label_offset`; an exported file keeps it)."""
    return dataset_label_offset(model.config)


@torch.inference_mode()
def _segmented(model: Segmenter, images: list[Path], mode: str | None, pictures: bool) -> Iterator[tuple]:
    """(index, class probabilities [K,h,w] at the eval transform's size, the full picture or None) per image,
    in batches of `inference.batch_size` images of equal transformed size (fewer when their probabilities
    would pass PROBABILITY_BUDGET), decoded in worker processes."""
    transform = SegmentationEvalTransform(model.config.data.eval_size, model.backbone.mean, model.backbone.std,
                                          multiple_of=model.input_multiple)  # fmt: skip
    loader = image_batches(images, transform, model.config.inference.batch_size, by_size=True, pictures=pictures,
                           workers=_workers(model), pin_memory=model.device.type == "cuda")  # fmt: skip
    for batch, _, indices, *drawn in loader:
        for part in budget_slices(batch, model.num_classes):
            chunk = batch[part].to(model.device, non_blocking=True)
            probabilities = model.predict_probabilities(chunk, mode=mode)
            shown = drawn[0][part] if drawn else [None] * len(chunk)
            yield from zip(indices[part].tolist(), probabilities, shown)


def segment_files(model: Segmenter, images: list[Path], mode: str | None = None) -> Iterator[tuple[int, Tensor]]:
    """(index, class probabilities [K,h,w] at the eval transform's size) per image file (see `_segmented`)."""
    for index, probabilities, _ in _segmented(model, images, mode, pictures=False):
        yield index, probabilities


def predict_segmentation(model: Segmenter, images: list[Path], out: OutputFolder, mode: str | None,
                         label_offset: int | None = None) -> None:  # fmt: skip
    """A label PNG and an overlay per image; each file decoded once, its full picture carried by the loader."""
    offset = default_label_offset(model) if label_offset is None else label_offset
    root = input_root(images)
    targets = [(out.claim(mirrored(p, root, ".labels.png")), out.claim(mirrored(p, root, ".overlay.png"))) for p in images]
    palette, names = default_palette(model.num_classes), getattr(model, "class_names", None)

    def write(labels: np.ndarray, picture: np.ndarray, label_path: Path, overlay_path: Path) -> None:
        with staged(label_path) as temporary:
            save_label_png(labels + offset, temporary, num_classes=model.num_classes + offset)
        with staged(overlay_path) as temporary:
            save_color_png(labels, temporary, palette, image=picture, class_names=names)

    with ParallelWriter(usable_cores()) as writer:  # PNGs encode on every core while the next batch runs
        for index, probabilities, picture in _segmented(model, images, mode, pictures=True):
            labels = labels_at_size(probabilities[None], picture.shape[:2])[0].cpu().numpy()
            writer.submit(picture.nbytes + labels.nbytes, write, labels, picture, *targets[index])
    convention = f"class id + {offset} (0 = the dataset's ignored 'other')" if offset == 1 else f"class id + {offset}" if offset else "class ids from 0"
    print(f"wrote label maps ({convention}) and overlays for {len(images)} images to {out.root}")


def predict(checkpoint: str | Path, paths: list[str], out: str | Path, *, topk: int = 5, mode: str | None = None,
            labels: str | None = None, overrides: list[str] | None = None, probabilities: bool = False,
            overwrite: bool = False, label_offset: int | None = None, device: str = "auto", devices: int = 1,
            resume: bool = False) -> None:  # fmt: skip
    """Predict every image and volume in `paths` into `out`, which mirrors their folders (see OutputFolder),
    on `device` (auto: the first GPU if there is one); volumes over `devices` processes, `resume` skipping
    those already predicted. A `.onnx` checkpoint (images only) runs in onnxruntime from its metadata."""
    if topk < 1:
        raise UserError(f"--topk {topk}: give 1 or more labels per image")
    if devices < 1:
        raise UserError(f"--devices {devices}: give 1 or more")
    images, volume_files, series = collect_inputs(paths)
    folder = OutputFolder(Path(out), inputs=[*images, *volume_files], overwrite=overwrite)
    items = volume_inputs(volume_files, series)
    if items and is_onnx(checkpoint):
        raise UserError(f"{checkpoint}: volumes such as {items[0].files[0]} are predicted with the .ckpt the file was "
                        "exported from (slices along three axes, spacing, NIfTI out); pass images to the .onnx")  # fmt: skip
    if items and read_checkpoint(checkpoint).config.get("task") in ("classification", "depth"):
        raise UserError(f"{checkpoint} is a {read_checkpoint(checkpoint).task} checkpoint and cannot segment volumes such as "
                        f"{items[0].files[0]}; pass images, or a segmentation checkpoint")  # fmt: skip
    if items:  # what was read (slices, spacing, orientation, modality), and a modality the model was not trained on
        announce_volumes(items, read_checkpoint(checkpoint).config)
    with folder.held("--out"):  # one writer per folder: a second run into it is refused, naming this one
        spread = devices > 1 and not images  # each process loads its own model: none here
        if spread:
            model = None
        elif is_onnx(checkpoint):
            model = load_onnx(checkpoint, device=device, overrides=overrides)
        else:
            model = load_model(checkpoint, device=device, overrides=overrides)
        if model is not None and model.config.task == "classification":
            predict_classification(model, images, folder, topk)
            return
        if model is not None and model.config.task == "depth":  # its metrics import torchmetrics: 1.4 s, here only
            from dinov3ds.commands.predict_depth import predict_depth_images

            predict_depth_images(model, images, folder, labels, workers=_workers(model))
            return
        if images:
            predict_segmentation(model, images, folder, mode, label_offset)
        if items:
            predict_volumes(model, items, folder, Path(labels) if labels else None, probabilities,
                            checkpoint=str(checkpoint), overrides=list(overrides or []), device=device, devices=devices,
                            resume=resume)  # fmt: skip
