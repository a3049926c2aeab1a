"""`dinov3ds predict`: images, folders and NIfTI volumes through a trained checkpoint, results on disk."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3ds.commands.output_files import OutputFolder, input_root, mirrored, printable
from dinov3ds.data.image_batches import image_batches
from dinov3ds.data.io import IMAGE_EXTENSIONS, find_images, load_image
from dinov3ds.data.transforms import SegmentationEvalTransform, round_to_multiple
from dinov3ds.data.volumes import (
    LABEL_SUFFIXES,
    NIFTI_SUFFIXES,
    is_nifti,
    load_volume,
    save_like,
    volume_stem,
)
from dinov3ds.errors import UserError
from dinov3ds.metrics import dice_and_iou
from dinov3ds.models.inference import labels_at_size
from dinov3ds.models.tasks import Classifier, Segmenter, load_model
from dinov3ds.models.volume_inference import predict_volume
from dinov3ds.viz import default_palette, save_color_png, save_label_png


def collect_inputs(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """Split the command line into images and NIfTI volumes; folders are searched."""
    images, volumes = [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path} does not exist; pass image files, folders or .nii/.nii.gz volumes")
        if path.is_dir():
            volumes += [p for p in sorted(path.rglob("*")) if p.is_file() and is_nifti(p)]
            images += find_images(path)
        elif is_nifti(path):
            volumes.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            raise UserError(f"{path}: unsupported file type; use {', '.join(sorted(IMAGE_EXTENSIONS))} or .nii/.nii.gz")
    if not images and not volumes:
        raise UserError(f"no images or volumes found in {', '.join(paths)}")
    return images, volumes


def _workers(model: Classifier | Segmenter) -> int:
    return min(8, model.config.data.num_workers)


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
    with open(jsonl, "w") as handle:
        for row in results:
            handle.write(json.dumps(row) + "\n")
    # surrogateescape: a file name that is not UTF-8 is written back as its own bytes, never a crash
    with open(table, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "probability", "top_labels", "top_probabilities"])
        for row in results:
            writer.writerow([row["image"], row["labels"][0], f"{row['probabilities'][0]:.6f}",
                             "|".join(row["labels"]), "|".join(f"{p:.6f}" for p in row["probabilities"])])  # fmt: skip
    if len(results) == 1:
        row = results[0]
        for label, probability in zip(row["labels"], row["probabilities"]):
            print(f"{probability:8.4f}  {label}")
    else:  # the top label of each image; the files hold all of them
        for row in results:
            print(f"{row['probabilities'][0]:8.4f}  {row['labels'][0]}  {printable(row['image'])}")
    print(f"wrote {jsonl} and {table} ({len(results)} images)")
    return results


def default_label_offset(model: Segmenter) -> int:
    """Label PNGs in the dataset's own convention: ADE20K-style data (`reduce_zero_label`: 0 = "other",
    classes from 1) gets class id + 1, so a prediction compares directly with an annotation; else the id."""
    data = model.config.data
    return 1 if data.reduce_zero_label or data.dataset == "ade20k" else 0


PROBABILITY_BUDGET = 1 << 30  # bytes of class probabilities per forward: a batch is split to stay below it


@torch.inference_mode()
def segment_files(model: Segmenter, images: list[Path], mode: str | None = None) -> Iterator[tuple[int, Tensor]]:
    """(index, class probabilities [K,h,w] at the eval transform's size) per image file, in batches of
    `inference.batch_size` images of equal transformed size (fewer when their probabilities would pass
    PROBABILITY_BUDGET), decoded in worker processes."""
    transform = SegmentationEvalTransform(model.config.data.eval_size, model.backbone.mean, model.backbone.std,
                                          multiple_of=model.input_multiple)  # fmt: skip
    loader = image_batches(images, transform.image_only, model.config.inference.batch_size,
                           output_size=transform.output_size, workers=_workers(model),
                           pin_memory=model.device.type == "cuda")  # fmt: skip
    for batch, _, indices in loader:
        per_image = model.num_classes * batch.shape[-2] * batch.shape[-1] * 4
        step = max(1, PROBABILITY_BUDGET // per_image)
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step].to(model.device, non_blocking=True)
            probabilities = model.predict_probabilities(chunk, mode=mode)
            yield from zip(indices[start : start + step].tolist(), probabilities)


def predict_segmentation(model: Segmenter, images: list[Path], out: OutputFolder, mode: str | None,
                         label_offset: int | None = None) -> None:  # fmt: skip
    offset = default_label_offset(model) if label_offset is None else label_offset
    root = input_root(images)
    targets = [(out.claim(mirrored(p, root, ".labels.png")), out.claim(mirrored(p, root, ".overlay.png"))) for p in images]
    palette = default_palette(model.num_classes)
    for index, probabilities in segment_files(model, images, mode):
        picture = np.asarray(load_image(images[index]))
        labels = labels_at_size(probabilities[None], picture.shape[:2])[0].cpu().numpy()
        label_path, overlay_path = targets[index]
        save_label_png(labels + offset, label_path, num_classes=model.num_classes + offset)
        save_color_png(labels, overlay_path, palette, image=picture)
    convention = f"class id + {offset} (0 = the dataset's ignored 'other')" if offset == 1 else f"class id + {offset}" if offset else "class ids from 0"
    print(f"wrote label maps ({convention}) and overlays for {len(images)} images to {out.root}")


def _slice_predictor(model: Segmenter):
    """uint8 slices [B,H,W,3] → (labels, foreground probability) through the segmenter."""
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    multiple = model.input_multiple

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255
        height, width = images.shape[-2:]
        size = (round_to_multiple(height, multiple), round_to_multiple(width, multiple))
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True) if size != (height, width) else images
        probabilities = model.predict_probabilities(((images - mean) / std).to(model.device))
        probabilities = F.interpolate(probabilities.float(), size=(height, width), mode="bilinear").cpu()
        foreground = probabilities[:, 1] if probabilities.shape[1] > 1 else probabilities[:, 0]
        return probabilities.argmax(dim=1).numpy(), foreground.numpy()

    return predict


def _matching_label(volume: Path, labels: Path | None) -> Path | None:
    if labels is None:
        return None
    if labels.is_file():
        return labels
    stem = volume_stem(volume)
    for suffix in LABEL_SUFFIXES:
        for extension in NIFTI_SUFFIXES:
            candidate = labels / f"{stem}{suffix}{extension}"
            if candidate.is_file():
                return candidate
    raise UserError(f"no label volume for {volume.name} in {labels}; name it like the image (optionally _seg/_label/_mask)")


def predict_volumes(model: Segmenter, volumes: list[Path], out: OutputFolder, labels: Path | None,
                    probabilities: bool) -> list[dict]:  # fmt: skip
    config = model.config
    if config.data.medical is None:
        raise UserError("this checkpoint was not trained on MRI slices (data.medical is unset); volumes need an MRI model")
    root = input_root(volumes)
    report_path = out.claim("volumes.jsonl")
    names = {path: mirrored(path, root, "").with_name(volume_stem(path)) for path in volumes}
    targets = {path: (out.claim(f"{names[path]}_pred.nii.gz"),
                      out.claim(f"{names[path]}_prob.nii.gz") if probabilities else None) for path in volumes}  # fmt: skip
    reports = []
    for path in volumes:
        image = load_volume(path)
        data = np.asanyarray(image.dataobj)
        predicted, foreground = predict_volume(
            data, _slice_predictor(model), axis=config.inference.volume_axis, preprocessing=config.data.medical,
            batch_size=config.inference.volume_batch_size, with_probabilities=probabilities,
        )  # fmt: skip
        prediction_path, probability_path = targets[path]
        save_like(predicted, image, prediction_path, np.uint8)
        if foreground is not None:
            save_like(foreground, image, probability_path, np.float32)
        report = {"volume": str(path), "prediction": str(prediction_path)}
        label_path = _matching_label(path, labels)
        if label_path is not None:
            label = np.asarray(load_volume(label_path).dataobj)
            if label.shape != predicted.shape:
                raise UserError(f"label volume {label_path} has shape {label.shape}, the image {path} has {predicted.shape}")
            report.update(dice_and_iou(predicted, np.rint(label).astype(np.int64)))
            print(f"{path.name}: Dice {report['dice']:.4f}  IoU {report['iou']:.4f}")
        reports.append(report)
    report_path.write_text("".join(json.dumps(r) + "\n" for r in reports))
    print(f"wrote {len(volumes)} predicted volumes to {out.root}")
    return reports


def predict(checkpoint: str | Path, paths: list[str], out: str | Path, *, topk: int = 5, mode: str | None = None,
            labels: str | None = None, overrides: list[str] | None = None, probabilities: bool = False,
            overwrite: bool = False, label_offset: int | None = None, device: str = "auto") -> None:  # fmt: skip
    """Predict every image and volume in `paths` into `out`, which mirrors their folders (see OutputFolder),
    on `device` (auto: the first GPU if there is one)."""
    if topk < 1:
        raise UserError(f"--topk {topk}: give 1 or more labels per image")
    images, volumes = collect_inputs(paths)
    folder = OutputFolder(Path(out), inputs=[*images, *volumes], overwrite=overwrite)
    model = load_model(checkpoint, device=device, overrides=overrides)
    if isinstance(model, Classifier):
        if volumes:
            raise UserError("a classification checkpoint cannot predict NIfTI volumes; pass images")
        predict_classification(model, images, folder, topk)
        return
    if images:
        predict_segmentation(model, images, folder, mode, label_offset)
    if volumes:
        predict_volumes(model, volumes, folder, Path(labels) if labels else None, probabilities)
