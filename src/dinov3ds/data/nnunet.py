"""Medical Segmentation Decathlon and nnU-Net v2 raw datasets, read as they are shipped.

    <root>/dataset.json      channel names (or MSD's "modality"), label names and ids, file ending
    <root>/imagesTr/<case>_0000.nii.gz, <case>_0001.nii.gz ...   (nnU-Net v2: one file per channel)
    <root>/imagesTr/<case>.nii.gz                                 (MSD: one file, channels in a 4th axis)
    <root>/labelsTr/<case>.nii.gz
    <root>/imagesTs/...                                           (cases to predict, same naming)
    <root>/splits_final.json                                      (optional: nnU-Net's folds)

Label ids map to class indices 0..K-1 in dataset.json's order of ids; every inconsistency (a case without
its label or a channel, shapes or affines that differ between a case's files, label values dataset.json
does not name) is a one-line error naming the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov3ds.data.volumes import load_volume
from dinov3ds.errors import UserError

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
AFFINE_TOLERANCE = 1e-4  # mm: affines of one case's files agreeing this closely are the same grid


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one file per channel, or one 4D file (MSD)
    label: Path | None


@dataclass(frozen=True)
class NnunetDataset:
    root: Path
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]  # index = class id
    label_values: tuple[int, ...]  # the stored label value of each class
    modality: str  # "ct" if dataset.json says CT for channel 0, else "mri"
    file_ending: str
    training: tuple[Case, ...]
    test: tuple[Case, ...]

    def split(self, fold: int, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
        """(train, val) cases: fold `fold` of splits_final.json when there is one, else a seeded split."""
        by_id = {case.case_id: case for case in self.training}
        splits_file = self.root / "splits_final.json"
        if splits_file.is_file():
            folds = _read_json(splits_file)
            if not isinstance(folds, list) or not 0 <= fold < len(folds):
                raise UserError(f"{splits_file} has {len(folds) if isinstance(folds, list) else 0} folds; set data.fold to one of them")
            named = set(folds[fold].get("train", [])) | set(folds[fold].get("val", []))
            unknown = sorted(named - set(by_id))
            if unknown:
                raise UserError(f"{splits_file} names cases that imagesTr lacks ({', '.join(unknown[:3])}); fix the split file")
            return [by_id[c] for c in folds[fold]["train"]], [by_id[c] for c in folds[fold]["val"]]
        from dinov3ds.data.medical import split_volumes

        chosen = split_volumes(sorted(by_id), val_fraction, 0.0, seed)
        return [by_id[c] for c in chosen["train"]], [by_id[c] for c in chosen["val"]]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); fix or restore it") from None


def _labels(spec: dict, path: Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path} has no 'labels'; list the label names and ids")
    pairs = []
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise UserError(f"{path}: label {key!r} is a region ({value}); region-based labels are not supported")
        name, number = (value, key) if str(key).isdigit() else (key, value)  # MSD: {"0": name}; v2: {name: 0}
        try:
            pairs.append((int(number), str(name)))
        except (TypeError, ValueError):
            raise UserError(f"{path}: label {key!r}: {value!r} is not an integer id") from None
    pairs.sort()
    if pairs[0][0] != 0:
        raise UserError(f"{path}: no label has id 0 (background); nnU-Net datasets start at 0")
    return tuple(name for _, name in pairs), tuple(number for number, _ in pairs)


def _cases(folder: Path, ending: str, channels: int, labels: Path | None) -> tuple[Case, ...]:
    if not folder.is_dir():
        return ()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    stems = [p.name[: -len(ending)] for p in files]
    grouped: dict[str, dict[int, Path]] = {}
    for path, stem in zip(files, stems, strict=True):
        match = CHANNEL_FILE.match(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, -1)
        grouped.setdefault(case, {})[channel] = path
    cases = []
    for case_id, by_channel in sorted(grouped.items()):
        if -1 in by_channel:  # MSD: one file per case (channels in a 4th axis)
            images = (by_channel[-1],)
        else:
            missing = [c for c in range(channels) if c not in by_channel]
            if missing:
                raise UserError(f"{folder}: case {case_id} lacks channel file {case_id}_{missing[0]:04d}{ending}; add it")
            images = tuple(by_channel[c] for c in range(channels))
        label = None
        if labels is not None:
            label = labels / f"{case_id}{ending}"
            if not label.is_file():
                raise UserError(f"{folder}: case {case_id} has no label {label}; add it or remove the case")
        cases.append(Case(case_id, images, label))
    return tuple(cases)


def read_nnunet(root: str | Path) -> NnunetDataset:
    """The dataset at `root` (the folder holding dataset.json), its files checked to exist."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{root} has no dataset.json; point data.root at an MSD or nnU-Net raw dataset folder")
    spec = _read_json(path)
    channels = spec.get("channel_names") or spec.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{path} has no 'channel_names' (or MSD 'modality'); name the input channels")
    channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    class_names, label_values = _labels(spec, path)
    ending = str(spec.get("file_ending", ".nii.gz"))
    training = _cases(root / "imagesTr", ending, len(channel_names), root / "labelsTr")
    if not training:
        raise UserError(f"{root / 'imagesTr'} holds no *{ending} cases; check data.root and file_ending")
    modality = "ct" if channel_names[0].strip().upper() == "CT" else "mri"
    test = _cases(root / "imagesTs", ending, len(channel_names), None)
    return NnunetDataset(root, channel_names, class_names, label_values, modality, ending, training, test)


def load_case(case: Case, dataset: NnunetDataset) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """(channels [C, X, Y, Z] float32, class indices [X, Y, Z] uint8 or None, the first file's image for
    geometry), with every file of the case checked to share one grid."""
    images = [load_volume(p, expect_3d=False) for p in case.images]
    reference = images[0]
    parts = []
    for path, image in zip(case.images, images, strict=True):
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim not in (3, 4):
            raise UserError(f"{path} has shape {data.shape}; a case file is a 3D volume (or 4D with channels last)")
        parts += [data] if data.ndim == 3 else list(np.moveaxis(data, -1, 0))  # MSD: channels in a 4th axis
    channels = np.stack(parts)
    if len(channels) != len(dataset.channel_names):
        raise UserError(f"{case.images[0]}: {len(channels)} channels, dataset.json names {len(dataset.channel_names)}")
    for path, image in zip(case.images, images, strict=True):
        _same_grid(path, image, case.images[0], reference)
    label = None
    if case.label is not None:
        label_image = load_volume(case.label)
        _same_grid(case.label, label_image, case.images[0], reference)
        label = class_indices(np.asarray(label_image.dataobj), dataset, case.label)
    return channels, label, reference


def _same_grid(path: Path, image: nib.Nifti1Image, reference_path: Path, reference: nib.Nifti1Image) -> None:
    if tuple(image.shape[:3]) != tuple(reference.shape[:3]):
        raise UserError(f"{path} is {image.shape[:3]} but {reference_path.name} is {reference.shape[:3]}; resample it onto the case's grid")
    if not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE):
        raise UserError(f"{path} and {reference_path.name} have different affines (voxel grids); resample it onto the case's grid")


def class_indices(values: np.ndarray, dataset: NnunetDataset, source: Path) -> np.ndarray:
    """Stored label values → class indices 0..K-1 (uint8); a value dataset.json does not name is an error."""
    rounded = np.rint(values).astype(np.int64)
    lookup = {value: index for index, value in enumerate(dataset.label_values)}
    present = np.unique(rounded)
    unknown = [int(v) for v in present if int(v) not in lookup]
    if unknown:
        raise UserError(f"{source} holds label values {unknown[:5]} that dataset.json does not name; fix the label or dataset.json")
    table = np.zeros(int(present.max()) + 1, dtype=np.uint8)
    for value in present:
        table[int(value)] = lookup[int(value)]
    return table[rounded]


def label_values(indices: np.ndarray, dataset_values: tuple[int, ...]) -> np.ndarray:
    """Class indices back to the dataset's stored label values (what a prediction file holds)."""
    return np.asarray(dataset_values, dtype=np.int64)[indices].astype(np.uint8 if max(dataset_values) < 256 else np.uint16)
