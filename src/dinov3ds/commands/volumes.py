"""`dinov3ds predict` on volumes: NIfTI files, nnU-Net cases (`<case>_0000.nii.gz`, `_0001` ...) and DICOM
series folders, written as NIfTI on the input's grid, with per-class 3D metrics against labels.

Two phases, so that many volumes can be split over devices and a rerun can resume:
1. predict: each volume's labels (and probabilities) written atomically as `<case>_pred.nii.gz`; with
   `--devices N` N processes take every N-th volume; with `--resume` a volume whose prediction is already
   there is skipped (it was renamed into place whole, so it is complete);
2. report: `volumes.jsonl`, and with `--labels` `metrics.json` and `per_case.csv` (`dinov3ds.metrics.volumes`),
   computed from the files written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from dinov3ds.commands.output_files import OutputFolder, input_root, mirrored, staged, written
from dinov3ds.config import Config
from dinov3ds.data.dicom import load_dicom_series
from dinov3ds.data.nnunet import mask_ignored
from dinov3ds.data.transforms import round_to_multiple
from dinov3ds.data.volumes import (
    LABEL_SUFFIXES,
    NIFTI_SUFFIXES,
    check_same_grid,
    integer_labels,
    load_volume,
    read_header,
    save_like,
    volume_stem,
)
from dinov3ds.errors import UserError
from dinov3ds.metrics.volumes import case_metrics, format_summary, write_reports
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.tasks import Segmenter, checkpoint_config, load_model
from dinov3ds.models.volume_inference import predict_volume

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
REPORTS = ("volumes.jsonl", "metrics.json", "per_case.csv")


@dataclass(frozen=True)
class VolumeInput:
    """One case: NIfTI channel files (one file, or nnU-Net's `_0000`, `_0001` ...), or a DICOM folder."""

    name: str
    files: tuple[Path, ...]
    dicom: bool = False

    def load(self) -> tuple[np.ndarray, nib.Nifti1Image]:
        """(channels [C, X, Y, Z] float32, the image whose grid outputs take)."""
        if self.dicom:
            image = load_dicom_series(self.files[0])
            return np.asarray(image.dataobj, dtype=np.float32)[None], image
        images = [load_volume(path, expect_3d=False) for path in self.files]
        parts = []
        for path, image in zip(self.files, images, strict=True):
            check_same_grid(path, image, self.files[0], images[0])
            data = np.asarray(image.dataobj, dtype=np.float32)
            if data.ndim not in (3, 4):
                raise UserError(f"{path}: expected a 3D volume (or 4D with channels last), got shape {data.shape}")
            parts += [data] if data.ndim == 3 else list(np.moveaxis(data, -1, 0))  # MSD: channels in a 4th axis
        return np.stack(parts), images[0]


def volume_inputs(nifti_files: list[Path], dicom_folders: list[Path]) -> list[VolumeInput]:
    """Cases from files (nnU-Net channel files of one folder grouped by case) and DICOM folders, in order. Two
    files for one channel of a case (`case.nii.gz` beside `case_0000.nii.gz`), or one case id in two input
    folders, are refused naming both files: outputs and labels are found by case id, one would replace the other."""
    grouped: dict[tuple[Path, str], dict[int, Path]] = {}
    for path in nifti_files:
        match = CHANNEL_FILE.match(volume_stem(path))
        key = (path.parent, match["case"] if match else volume_stem(path))
        channel = int(match["channel"]) if match else 0
        if channel in grouped.get(key, {}):
            raise UserError(f"{grouped[key][channel]} and {path} are both channel {channel} of case {key[1]}; "
                            "remove or rename one")  # fmt: skip
        grouped.setdefault(key, {})[channel] = path
    inputs = []
    for (_, case), channels in grouped.items():
        if sorted(channels) != list(range(len(channels))):
            raise UserError(f"case {case}: channel files {sorted(channels)} are not numbered 0000, 0001, ...; add the missing ones")
        inputs.append(VolumeInput(case, tuple(channels[c] for c in range(len(channels)))))
    inputs += [VolumeInput(folder.name, (folder,), dicom=True) for folder in dicom_folders]
    first: dict[str, Path] = {}
    for item in inputs:
        if item.name in first:
            raise UserError(f"{first[item.name]} and {item.files[0]} are both case {item.name!r}; their outputs and labels "
                            "would be one file: predict the folders in separate runs, or rename one")  # fmt: skip
        first[item.name] = item.files[0]
    return inputs


def slice_predictor(model: Segmenter):
    """uint8 slices [B, H, W, 3] → class probabilities float32 [B, K, H, W] through the segmenter."""
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    multiple = model.input_multiple

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255
        height, width = images.shape[-2:]
        size = (round_to_multiple(height, multiple), round_to_multiple(width, multiple))
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True) if size != (height, width) else images
        probabilities = model.predict_probabilities(((images - mean) / std).to(model.device))
        return F.interpolate(probabilities.float(), size=(height, width), mode="bilinear").cpu().numpy()

    return predict


def _stored_values(config: Config, num_classes: int) -> np.ndarray:
    """Class index → the value a label file stores (dataset.json's ids, from data.label_map; the ignored id
    maps to no class and is never written)."""
    label_map = config.data.label_map or {}
    values = np.arange(num_classes)
    for stored, index in label_map.items():
        if index < num_classes:
            values[index] = stored
    return values


def _ignored_values(config: Config) -> set[int]:
    """Stored label values that count for nothing (nnU-Net's "ignore" label, mapped to data.ignore_index)."""
    return {stored for stored, index in (config.data.label_map or {}).items() if index == config.data.ignore_index}


def check_labels(items: list[VolumeInput], labels: Path | None) -> None:
    """Before any prediction: every case has its label volume, and a NIfTI case's label lies on its grid (shape,
    spacing, origin, direction, as nnU-Net's integrity check; DICOM cases are checked once read)."""
    for item in items:
        label_path = matching_label(item, labels)
        if label_path is not None and not item.dicom:
            check_same_grid(label_path, read_header(label_path), item.files[0], read_header(item.files[0]))


def _write_atomically(array: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype) -> None:
    with staged(path) as temporary:  # a private name renamed onto path: never through a link, never half
        if array.ndim == 4:  # class probabilities [K, X, Y, Z] → channels last
            image = nib.Nifti1Image(np.moveaxis(array, 0, -1).astype(dtype), reference.affine)
            image.header.set_xyzt_units("mm")
            nib.save(image, temporary)
        else:
            save_like(array, reference, temporary, dtype)


def predict_cases(model: Segmenter, items: list[VolumeInput], targets: dict[str, tuple[Path, Path | None]]) -> None:
    """Phase 1 for `items`: predict and write each case's files."""
    config = model.config
    medical = config.data.medical
    values = _stored_values(config, model.num_classes)
    for item in items:
        channels, reference = item.load()
        if len(channels) != medical.volume_channels:
            raise UserError(f"{item.files[0].name}: {len(channels)} channels, the model was trained on volumes with "
                            f"{medical.volume_channels}; give the same channels (nnU-Net: <case>_0000 ...)")  # fmt: skip
        prediction_path, probability_path = targets[item.name]
        labels, probabilities = predict_volume(
            channels, slice_predictor(model), options=medical, num_classes=model.num_classes,
            axes=config.inference.volume_axes or [config.inference.volume_axis], zooms=reference.header.get_zooms()[:3],
            batch_size=config.inference.volume_batch_size, with_probabilities=probability_path is not None,
            progress=config.trainer.progress_bar,
        )  # fmt: skip
        _write_atomically(values[labels], reference, prediction_path, np.uint8 if values.max() < 256 else np.uint16)
        if probabilities is not None:
            kept = probabilities[1] if model.num_classes == 2 else probabilities  # binary: the foreground's
            _write_atomically(kept, reference, probability_path, np.float32)


def _spawned(rank: int, checkpoint: str, overrides: list[str], device: str, items, targets, world: int) -> None:
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    place = f"cuda:{rank}" if device.startswith("cuda") else "cpu"
    predict_cases(load_model(checkpoint, device=place, overrides=overrides), items[rank::world], targets)


def matching_label(item: VolumeInput, labels: Path | None) -> Path | None:
    if labels is None:
        return None
    if labels.is_file():
        return labels
    for suffix in LABEL_SUFFIXES:
        for extension in NIFTI_SUFFIXES:
            candidate = labels / f"{item.name}{suffix}{extension}"
            if candidate.is_file():
                return candidate
    raise UserError(f"no label volume for {item.name} in {labels}; name it like the case (optionally _seg/_label/_mask)")


def report(config: Config, names: list[str], items: list[VolumeInput], targets: dict, out: OutputFolder,
           labels: Path | None) -> list[dict]:  # fmt: skip
    """Phase 2: volumes.jsonl, and per-class metrics when labels are given, from the written files."""
    index_of = {int(v): i for i, v in enumerate(_stored_values(config, len(names)))}
    ignore = config.data.ignore_index
    index_of.update(dict.fromkeys(_ignored_values(config), ignore))
    rows, cases = [], {}
    for item in items:
        prediction_path = targets[item.name][0]
        row = {"volume": str(item.files[0]), "prediction": str(prediction_path)}
        label_path = matching_label(item, labels)
        if label_path is not None:
            predicted = nib.load(prediction_path)
            truth = load_volume(label_path)
            check_same_grid(label_path, truth, item.files[0], predicted)  # the prediction lies on the input's grid
            stored = integer_labels(np.asarray(truth.dataobj), label_path)
            unknown = sorted(set(np.unique(stored).tolist()) - set(index_of))
            if unknown:
                raise UserError(f"{label_path} holds label values {unknown[:5]} the model does not know; check the label file")
            lookup = np.vectorize(index_of.get, otypes=[np.int64])
            cases[item.name] = case_metrics(*mask_ignored(lookup(np.asarray(predicted.dataobj)), lookup(stored), ignore),
                                            predicted.header.get_zooms()[:3], names)  # fmt: skip
            row["classes"] = cases[item.name]
            shown = item.files[0].name if not item.dicom and len(item.files) == 1 else item.name
            if len(names) == 2:
                row.update({k: cases[item.name][names[1]][k] for k in ("dice", "iou")})
                print(f"{shown}: Dice {row['dice']:.4f}  IoU {row['iou']:.4f}")
            else:
                print(f"{shown}: " + "  ".join(f"{c} Dice {v['dice']:.4f}" for c, v in cases[item.name].items()))
        rows.append(row)
    with written(out.claim("volumes.jsonl")) as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    if cases:
        for name in REPORTS[1:]:
            out.claim(name)
        with out.staged_files() as folder:
            summary = write_reports(cases, folder)
        print(format_summary(summary))
    return rows


def predict_volumes(model: Segmenter | None, items: list[VolumeInput], out: OutputFolder, labels: Path | None,
                    probabilities: bool, *, checkpoint: str, overrides: list[str], device: str, devices: int = 1,
                    resume: bool = False) -> list[dict]:  # fmt: skip
    """Predict `items` into `out`, by `model` or over `devices` processes that each load the checkpoint (the
    model is then None here), and report."""
    device = str(resolve_device(device))
    saved = read_checkpoint(checkpoint, expected_task="segmentation")
    config = checkpoint_config(saved, checkpoint, overrides)
    if config.data.medical is None:
        raise UserError("this checkpoint was not trained on medical slices (data.medical is unset); volumes need a medical model")
    check_labels(items, labels)
    root = input_root([item.files[0] for item in items])
    targets, todo = {}, []
    for item in items:
        stem = mirrored(item.files[0], root, "").with_name(item.name)
        names = (f"{stem}_pred.nii.gz", f"{stem}_prob.nii.gz" if probabilities else None)
        if resume and all(name is None or (out.root / name).is_file() for name in names):
            targets[item.name] = tuple(out.root / name if name else None for name in names)
            continue
        targets[item.name] = tuple(out.claim(name) if name else None for name in names)
        todo.append(item)
    if resume:
        out.overwrite = True  # the reports summarise every case, done before or now: they are rewritten
        print(f"predicting {len(todo)} volumes; {len(items) - len(todo)} were done before")
    if model is None and len(todo) > 1:
        torch.multiprocessing.spawn(_spawned, args=(checkpoint, overrides, device, todo, targets, devices), nprocs=devices)
    elif todo:
        predict_cases(model or load_model(checkpoint, device=device, overrides=overrides), todo, targets)
    rows = report(config, list(saved.class_names), items, targets, out, labels)
    print(f"wrote {len(todo)} predicted volumes to {out.root}")
    return rows
