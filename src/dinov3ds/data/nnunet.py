"""Medical Segmentation Decathlon and nnU-Net v2 raw datasets, read as they are shipped.

    <root>/dataset.json      channel names (or MSD's "modality"), label names and ids, file ending
    <root>/imagesTr/<case>_0000.nii.gz, <case>_0001.nii.gz ...   (nnU-Net v2: one file per channel)
    <root>/imagesTr/<case>.nii.gz                                 (MSD: one file, channels in a 4th axis)
    <root>/labelsTr/<case>.nii.gz
    <root>/imagesTs/...                                           (cases to predict, same naming)
    <root>/splits_final.json                                      (optional: nnU-Net's folds)

Label ids map to class indices 0..K-1 in dataset.json's order of ids; nnU-Net v2's `"ignore"` label is no class:
its voxels become IGNORE_CLASS, left out of the loss and the metrics and never predicted. Every inconsistency
(a case without its label or a channel, a file that fits no channel pattern, shapes or affines that differ
between a case's files, label values dataset.json does not name or that are not integers, a split naming a
case twice) is a one-line error naming the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov3ds.data.volumes import check_same_grid, integer_labels, load_volume
from dinov3ds.errors import UserError

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
NUMBER = re.compile(r"^-?\d+$")
IGNORE_CLASS = 255  # class index of the "ignore" label's voxels (data.ignore_index); classes are 0..254
MAX_LABEL_ID = 65535  # prediction files store label ids as uint16 at most


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
    ignore_value: int | None = None  # the stored id of dataset.json's "ignore" label, if it has one

    def split(self, fold: int, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
        """(train, val) cases: fold `fold` of splits_final.json when there is one, else a seeded split."""
        by_id = {case.case_id: case for case in self.training}
        splits_file = self.root / "splits_final.json"
        if splits_file.is_file():
            train, val = _read_fold(splits_file, fold, set(by_id))
        else:
            from dinov3ds.data.medical import split_volumes

            chosen = split_volumes(sorted(by_id), val_fraction, 0.0, seed)
            train, val = chosen["train"], chosen["val"]
        return [by_id[c] for c in train], [by_id[c] for c in val]


def _read_fold(path: Path, fold: int, known: set[str]) -> tuple[list[str], list[str]]:
    """Fold `fold` of nnU-Net's splits_final.json (a list of {"train": [ids], "val": [ids]}), checked: every case
    known, none twice, none in both lists, neither list empty."""
    folds = _read_json(path)
    if not isinstance(folds, list) or not all(isinstance(entry, dict) for entry in folds):
        raise UserError(f'{path} is not a list of folds ({{"train": [...], "val": [...]}} each); write it as nnU-Net does')
    if not 0 <= fold < len(folds):
        raise UserError(f"{path} has {len(folds)} folds; set data.fold to one of them (0..{len(folds) - 1})")
    lists = {}
    for key in ("train", "val"):
        names = folds[fold].get(key)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UserError(f'{path}: fold {fold} has no "{key}" list of case ids; add "{key}": ["<case>", ...]')
        if not names:
            raise UserError(f'{path}: fold {fold} has an empty "{key}" list; add cases to it, or delete the file '
                            "to split by data.val_fraction")  # fmt: skip
        twice = sorted(name for name, count in Counter(names).items() if count > 1)
        if twice:
            raise UserError(f'{path}: fold {fold} lists {twice[0]!r} twice in "{key}"; list each case once')
        lists[key] = names
    both = sorted(set(lists["train"]) & set(lists["val"]))
    if both:
        raise UserError(f"{path}: fold {fold} puts {len(both)} case(s) in both train and val ({', '.join(both[:3])}); "
                        "val would score training cases: keep each case in one list")  # fmt: skip
    unknown = sorted((set(lists["train"]) | set(lists["val"])) - known)
    if unknown:
        raise UserError(f"{path} names cases that imagesTr lacks ({', '.join(unknown[:3])}); fix the split file")
    return lists["train"], lists["val"]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice is refused (json keeps the last one without a word)."""
    counts = Counter(key for key, _ in pairs)
    repeated = [key for key, count in counts.items() if count > 1]
    if repeated:
        raise UserError(f"key {repeated[0]!r} appears twice in one object; keep one")
    return dict(pairs)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); fix or restore it") from None
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _label_id(number: object, name: str, path: Path) -> int:
    if isinstance(number, bool) or not (isinstance(number, int) or (isinstance(number, str) and NUMBER.match(number))):
        raise UserError(f"{path}: label {name!r}: {number!r} is not an integer id")
    value = int(number)
    if not 0 <= value <= MAX_LABEL_ID:
        raise UserError(f"{path}: label {name!r} has id {value}; label ids are 0..{MAX_LABEL_ID}, fix the id")
    return value


def _labels(spec: dict, path: Path) -> tuple[tuple[str, ...], tuple[int, ...], int | None]:
    """(class names, their stored ids, the "ignore" label's id or None), ordered by id."""
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path} has no 'labels'; list the label names and ids")
    pairs = []
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise UserError(f"{path}: label {key!r} is a region ({value}); region-based labels are not supported")
        name, number = (value, key) if NUMBER.match(str(key)) else (key, value)  # MSD: {"0": name}; v2: {name: 0}
        pairs.append((_label_id(number, str(name), path), str(name)))
    pairs.sort()
    ids = [number for number, _ in pairs]
    for number, count in Counter(ids).items():
        if count > 1:
            names = [name for n, name in pairs if n == number]
            raise UserError(f"{path}: labels {' and '.join(map(repr, names))} have the same id {number}; give each its own id")
    names = [name for _, name in pairs]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UserError(f"{path}: two labels are named {repeated[0]!r}; give each label its own name")
    ignore = next((number for number, name in pairs if name == "ignore"), None)
    if ignore is not None:
        if ignore != pairs[-1][0]:
            raise UserError(f'{path}: the "ignore" label ({ignore}) must have the highest id, as nnU-Net requires')
        pairs = pairs[:-1]
    if not pairs or pairs[0][0] != 0:
        raise UserError(f"{path}: no label has id 0 (background); nnU-Net datasets start at 0")
    if len(pairs) > IGNORE_CLASS:
        raise UserError(f"{path} names {len(pairs)} classes; at most {IGNORE_CLASS} are supported")
    return tuple(name for _, name in pairs), tuple(number for number, _ in pairs), ignore


def _channel_names(spec: dict, path: Path) -> tuple[str, ...]:
    channels = spec.get("channel_names") or spec.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{path} has no 'channel_names' (or MSD 'modality'); name the input channels")
    bad = [key for key in channels if not str(key).isdigit()]
    if bad:
        raise UserError(f'{path}: channel_names key {bad[0]!r} is not a channel number; write {{"0": "T1", "1": "T2"}}')
    numbers = sorted(int(key) for key in channels)
    if numbers != list(range(len(numbers))):
        raise UserError(f"{path}: channel_names numbers {numbers} are not 0..{len(numbers) - 1}; number the channels "
                        "from 0, as the files' _0000, _0001 ... suffixes")  # fmt: skip
    return tuple(str(channels[key]) for key in sorted(channels, key=int))


def _stray_files(folder: Path, files: list[Path], ending: str, channels: int) -> None:
    """Refuse, listing every one, files the dataset would otherwise drop or misread: once a folder holds
    `<case>_<channel>` files, each file must be one (a `case.nii.gz` beside `case_0000.nii.gz` is neither), and
    its channel one of dataset.json's."""
    matches = {path: CHANNEL_FILE.match(path.name[: -len(ending)]) for path in files}
    if not any(matches.values()):
        return  # MSD: one file per case, channels in a 4th axis
    pattern = f"<case>_0000{ending}" + (f"..<case>_{channels - 1:04d}{ending}" if channels > 1 else "")
    stray = [path.name for path, match in matches.items() if match is None]
    if stray:
        raise UserError(f"{folder}: {len(stray)} file(s) match no channel pattern {pattern} ({', '.join(stray)}); "
                        "rename or remove them")  # fmt: skip
    extra = [path.name for path, match in matches.items() if int(match["channel"]) >= channels]
    if extra:
        raise UserError(f"{folder}: {len(extra)} file(s) of a channel beyond the {channels} that channel_names lists "
                        f"({', '.join(extra)}); remove them or add their channels to dataset.json")  # fmt: skip


def _cases(folder: Path, ending: str, channels: int, labels: Path | None) -> tuple[Case, ...]:
    if not folder.is_dir():
        return ()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    _stray_files(folder, files, ending, channels)
    grouped: dict[str, dict[int, Path]] = {}
    for path in files:
        match = CHANNEL_FILE.match(path.name[: -len(ending)])
        case, channel = (match["case"], int(match["channel"])) if match else (path.name[: -len(ending)], -1)
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
    if not isinstance(spec, dict):
        raise UserError(f"{path} is not a JSON object; write dataset.json as nnU-Net does")
    channel_names = _channel_names(spec, path)
    class_names, label_values, ignore = _labels(spec, path)
    ending = str(spec.get("file_ending", ".nii.gz"))
    training = _cases(root / "imagesTr", ending, len(channel_names), root / "labelsTr")
    if not training:
        raise UserError(f"{root / 'imagesTr'} holds no *{ending} cases; check data.root and file_ending")
    modality = "ct" if channel_names[0].strip().upper() == "CT" else "mri"
    test = _cases(root / "imagesTs", ending, len(channel_names), None)
    return NnunetDataset(root, channel_names, class_names, label_values, modality, ending, training, test, ignore)


def load_case(case: Case, dataset: NnunetDataset) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """(channels [C, X, Y, Z] float32, class indices [X, Y, Z] uint8 (IGNORE_CLASS where ignored) or None, the
    first file's image for geometry), with every file of the case checked to share one grid."""
    images = [load_volume(p, expect_3d=False) for p in case.images]
    reference = images[0]
    for path, image in zip(case.images[1:], images[1:], strict=True):
        check_same_grid(path, image, case.images[0], reference)
    parts = []
    for path, image in zip(case.images, images, strict=True):
        data = np.asarray(image.dataobj, dtype=np.float32)
        if data.ndim not in (3, 4):
            raise UserError(f"{path} has shape {data.shape}; a case file is a 3D volume (or 4D with channels last)")
        parts += [data] if data.ndim == 3 else list(np.moveaxis(data, -1, 0))  # MSD: channels in a 4th axis
    channels = np.stack(parts)
    if len(channels) != len(dataset.channel_names):
        raise UserError(f"{case.images[0]}: {len(channels)} channels, dataset.json names {len(dataset.channel_names)}")
    label = None
    if case.label is not None:
        label_image = load_volume(case.label)
        check_same_grid(case.label, label_image, case.images[0], reference)
        label = class_indices(np.asarray(label_image.dataobj), dataset, case.label)
    return channels, label, reference


def class_indices(values: np.ndarray, dataset: NnunetDataset, source: Path) -> np.ndarray:
    """Stored label values → class indices 0..K-1 (uint8), the "ignore" label's → IGNORE_CLASS; a value
    dataset.json does not name, or a fractional one, is an error."""
    stored = integer_labels(values, source)
    lookup = {value: index for index, value in enumerate(dataset.label_values)}
    if dataset.ignore_value is not None:
        lookup[dataset.ignore_value] = IGNORE_CLASS
    present = np.unique(stored)
    unknown = [int(v) for v in present if int(v) not in lookup]
    if unknown:
        raise UserError(f"{source} holds label values {unknown[:5]} that dataset.json does not name; fix the label or dataset.json")
    table = np.zeros(int(present.max()) + 1, dtype=np.uint8)
    for value in present:
        table[int(value)] = lookup[int(value)]
    return table[stored]


def mask_ignored(prediction: np.ndarray, reference: np.ndarray, ignore: int = IGNORE_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps with the reference's ignored voxels set to background, so they count for no class (as
    nnU-Net v2 leaves them out of its metrics)."""
    ignored = reference == ignore
    if not ignored.any():
        return prediction, reference
    return np.where(ignored, 0, prediction), np.where(ignored, 0, reference)


def label_values(indices: np.ndarray, dataset_values: tuple[int, ...]) -> np.ndarray:
    """Class indices back to the dataset's stored label values (what a prediction file holds)."""
    return np.asarray(dataset_values, dtype=np.int64)[indices].astype(np.uint8 if max(dataset_values) < 256 else np.uint16)
