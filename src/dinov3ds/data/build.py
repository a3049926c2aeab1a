"""From a config's `data` section to train/val datasets with the right transforms and class names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from torch.utils.data import Dataset

from dinov3ds.config import Config, cache_dir
from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data.classification import IMAGENETTE_CLASSES, ImageFolderDataset
from dinov3ds.data.depth import depth_splits
from dinov3ds.data.fingerprint import nnunet_fingerprint, slice_folder_fingerprint
from dinov3ds.data.io import load_image, load_mask
from dinov3ds.data.layout import MaskLabels, SegmentationLayout, ade20k_layout, ade20k_split
from dinov3ds.data.medical import load_mri_slice
from dinov3ds.data.medical_plan import medical_kind, self_configure
from dinov3ds.data.nnunet import IGNORE_CLASS, read_nnunet
from dinov3ds.data.sampling import ForegroundOversampling, class_presence
from dinov3ds.data.segmentation import ADE20K_CLASSES, SegmentationFolderDataset
from dinov3ds.data.transforms import (
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    classification_eval_transform,
    classification_train_transform,
)
from dinov3ds.errors import UserError

Stats = tuple[float, float, float]


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]


def _classification_split(config: Config, split: str, mean: Stats, std: Stats, train: bool) -> ImageFolderDataset:
    data = config.data
    transform = (classification_train_transform if train and data.augment else classification_eval_transform)(
        data.image_size, mean, std
    )
    mapping = IMAGENETTE_CLASSES if data.dataset == "imagenette" else None
    return ImageFolderDataset(data.root, split, transform, class_names=mapping, on_bad_sample=data.on_bad_sample)


def _classification(config: Config, mean: Stats, std: Stats) -> DataSplits:
    data = config.data
    train = _classification_split(config, data.train_split, mean, std, train=True)
    val = _classification_split(config, data.val_split, mean, std, train=False)
    if train.classes != val.classes:
        raise UserError(
            f"{data.root}: train and val class folders differ ({sorted(set(train.classes) ^ set(val.classes))}); "
            "both splits need the same class folders"
        )
    for key, value in (("data.num_classes", data.num_classes), ("data.class_names", len(data.class_names or []) or None)):
        if value is not None and value != len(train.classes):
            raise UserError(
                f"{key} says {value} classes but {data.root} has {len(train.classes)} class folders; fix or remove {key}"
            )
    return DataSplits(train, val, data.class_names or train.class_names)


def segmentation_class_names(config: Config) -> list[str]:
    data = config.data
    if data.class_names:
        return list(data.class_names)
    if data.dataset == "ade20k":
        return list(ADE20K_CLASSES)
    if data.num_classes:
        return [f"class_{i}" for i in range(data.num_classes)]
    raise UserError("data.class_names (or data.num_classes) is required for a segmentation folder dataset")


def image_loader(config: Config):
    """Natural images load as RGB; MRI slices go through the one shared slice preprocessing."""
    if config.data.medical is not None:
        if config.data.medical.modality == "ct":
            raise UserError("CT slices in an image folder have lost their Hounsfield units; use data.dataset: nnunet "
                            "on the volumes (or modality: mri for PNG slices)")  # fmt: skip
        return partial(load_mri_slice, options=config.data.medical)
    return load_image


def segmentation_layout(config: Config) -> tuple[SegmentationLayout, tuple[str, str]]:
    """The config's segmentation dataset: where its files are, how its masks are read, its (train, val) splits."""
    data = config.data
    if data.dataset == "ade20k":
        layout = ade20k_layout(data.root, len(ADE20K_CLASSES))
        return layout, (ade20k_split(data.train_split), ade20k_split(data.val_split))
    labels = MaskLabels(data.ignore_index, dict(data.label_map or {}), data.reduce_zero_label,
                        len(segmentation_class_names(config)))  # fmt: skip
    layout = SegmentationLayout(Path(data.root), data.images_dir, data.annotations_dir, data.mask_suffix, labels)
    return layout, (data.train_split, data.val_split)


def _train_transform(config: Config, mean: Stats, std: Stats) -> SegmentationTrainTransform:
    data = config.data
    medical = data.medical or SlicePreprocessing()
    return SegmentationTrainTransform(
        data.image_size, mean, std, scale_range=tuple(data.scale_range) if data.augment else (1.0, 1.0),
        base_size=data.base_size, ignore_index=data.ignore_index, photometric=data.photometric and data.augment,
        cat_max_ratio=data.cat_max_ratio if data.augment else 1.0, hflip=data.augment,
        rotation=medical.rotation if data.augment else 0.0, rotation_probability=medical.rotation_probability,
        vflip=medical.vertical_flip and data.augment,
    )  # fmt: skip


def _oversampled(config: Config, dataset: Dataset, transform: SegmentationTrainTransform, labels) -> Dataset:
    """The training set with `data.medical.foreground_share` of its samples forced onto a structure."""
    medical = config.data.medical
    if medical is None or not medical.foreground_share or not config.data.augment:
        return dataset
    presence = class_presence(labels, len(segmentation_class_names(config)))
    return ForegroundOversampling(dataset, transform, presence, medical.foreground_share)


def _segmentation_split(config: Config, split: str, mean: Stats, std: Stats, input_multiple: int) -> Dataset:
    data = config.data
    if split == "train":
        transform = _train_transform(config, mean, std)
    else:
        transform = SegmentationEvalTransform(data.eval_size, mean, std, multiple_of=input_multiple)
    layout, (train_split, val_split) = segmentation_layout(config)
    dataset = SegmentationFolderDataset(layout, train_split if split == "train" else val_split, transform,
                                        image_loader=image_loader(config), on_bad_sample=data.on_bad_sample)  # fmt: skip
    if split != "train":
        return dataset
    return _oversampled(config, dataset, transform, (layout.labels.prepare(load_mask(m), m) for _, m in dataset.samples))


def resolve_dataset_settings(config: Config, *, configure: bool = True) -> list[str]:
    """Fill in what an nnU-Net / MSD dataset says about itself, so the saved config and every checkpoint hold
    it: class names from dataset.json, `data.medical` for its modality (MRI defaults, or CT), the stored label
    ids (its "ignore" label's to `data.ignore_index`). The split is checked here too, before a run folder is
    written: an empty or overlapping fold must not cost an epoch. Segmentation folders: each split must hold
    pairs. Medical data (nnU-Net datasets, prepare-volumes folders) are then self-configured from their
    fingerprint (data/medical_plan.py): returns the fingerprint and the derived settings as report lines,
    none for other data. `configure=False` (evaluation of a trained model) keeps the settings it was trained
    with and measures nothing."""
    data = config.data
    if data.dataset in ("segmentation_folder", "ade20k") and config.task == "segmentation":
        _check_pairs_exist(config)
    if medical_kind(config) == "slices" and configure:
        layout, (train_split, _) = segmentation_layout(config)
        fingerprint = slice_folder_fingerprint(Path(data.root), layout.image_folder(train_split), layout.pair(train_split).pairs,
                                               layout.labels, segmentation_class_names(config), cache_dir())  # fmt: skip
        return self_configure(config, fingerprint)
    if data.dataset != "nnunet":
        return []
    _check_root(config)
    dataset = read_nnunet(data.root)
    names = list(dataset.class_names)
    if data.class_names is not None and list(data.class_names) != names:
        raise UserError(f"data.class_names {data.class_names} differ from dataset.json's labels {names}; remove data.class_names")
    data.class_names, data.num_classes = names, len(names)
    medical = _with_dataset_modality(data.medical or SlicePreprocessing(), dataset.modality, data.root)
    data.medical = medical.model_copy(update={"volume_channels": len(dataset.channel_names)})
    label_map = {value: index for index, value in enumerate(dataset.label_values)}
    if dataset.ignore_value is not None:
        if data.ignore_index != IGNORE_CLASS:
            raise UserError(f"data.ignore_index is {data.ignore_index}, but {data.root}/dataset.json's \"ignore\" label is "
                            f"read as {IGNORE_CLASS}; remove data.ignore_index")  # fmt: skip
        label_map[dataset.ignore_value] = IGNORE_CLASS
    if any(value != index for value, index in label_map.items()):  # stored ids, e.g. 0, 1, 2, 4
        data.label_map = label_map
    train_cases, _ = dataset.split(data.fold, data.val_fraction, config.seed)
    if not configure:
        return []

    def ct_range(percentiles: tuple[float, float]) -> tuple[float, float]:
        from dinov3ds.data.volume_slices import ct_intensity_range

        return ct_intensity_range(train_cases, dataset, percentiles)

    return self_configure(config, nnunet_fingerprint(dataset, train_cases, cache_dir()), ct_range)


def _check_pairs_exist(config: Config) -> None:
    """An empty split of a segmentation folder, said before training writes anything."""
    layout, splits = segmentation_layout(config)
    for split in dict.fromkeys(splits):
        if layout.image_folder(split).is_dir() and layout.mask_folder(split).is_dir() and not layout.pair(split).pairs:
            raise UserError(f"no image/mask pairs under {layout.image_folder(split)} and {layout.mask_folder(split)}; "
                            "check root, split and mask_suffix")  # fmt: skip


def _with_dataset_modality(medical: SlicePreprocessing, modality: str, root: str) -> SlicePreprocessing:
    """dataset.json's modality unless the config names one: `medical: {context: 1}` on a CT dataset is CT."""
    if "modality" in medical.model_fields_set:
        return medical
    try:
        return SlicePreprocessing.model_validate({**medical.model_dump(exclude_unset=True), "modality": modality})
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"data.medical: {root}/dataset.json says {modality.upper()}, and {reason}") from None


def _nnunet_splits(config: Config, mean: Stats, std: Stats, input_multiple: int, *, train: bool = True) -> DataSplits:
    from dinov3ds.data.volume_slices import VolumeSlices

    resolve_dataset_settings(config, configure=train)  # evaluation: the checkpoint's settings, no fingerprint
    data = config.data
    dataset = read_nnunet(data.root)
    train_cases, val_cases = dataset.split(data.fold, data.val_fraction, config.seed)
    cache = cache_dir() / "volume_slices"
    val = VolumeSlices(val_cases, dataset, data.medical, SegmentationEvalTransform(data.eval_size, mean, std, multiple_of=input_multiple), cache)
    if not train:
        return DataSplits(None, val, list(dataset.class_names))
    transform = _train_transform(config, mean, std)
    slices = VolumeSlices(train_cases, dataset, data.medical, transform, cache)
    maps = [np.load(folder / "labels.npy", mmap_mode="r") for folder in slices.folders]
    train_set = _oversampled(config, slices, transform, (maps[number][index] for number, index in slices.entries))
    return DataSplits(train_set, val, list(dataset.class_names))


def _check_root(config: Config) -> None:
    if not Path(config.data.root).exists():
        raise UserError(
            f"data.root {config.data.root} does not exist; download a dataset (dinov3ds download ...) "
            "or point data.root at your folder"
        )


def build_datasets(config: Config, mean: Stats, std: Stats, input_multiple: int = 16) -> DataSplits:
    """Train and val datasets for the config's task; `mean`/`std` come from the backbone's preset."""
    _check_root(config)
    if config.task == "depth":
        return DataSplits(*depth_splits(config, mean, std, input_multiple), ["depth"])
    if config.task == "classification":
        return _classification(config, mean, std)
    if config.data.dataset == "nnunet":
        return _nnunet_splits(config, mean, std, input_multiple)
    train = _segmentation_split(config, "train", mean, std, input_multiple)
    val = _segmentation_split(config, "val", mean, std, input_multiple)
    return DataSplits(train, val, segmentation_class_names(config))


def build_validation_dataset(config: Config, mean: Stats, std: Stats, input_multiple: int = 16) -> Dataset:
    """The validation split alone (evaluation): the training split need not exist."""
    _check_root(config)
    if config.task == "depth":
        return depth_splits(config, mean, std, input_multiple, train=False)[1]
    if config.task == "classification":
        return _classification_split(config, config.data.val_split, mean, std, train=False)
    if config.data.dataset == "nnunet":
        return _nnunet_splits(config, mean, std, input_multiple, train=False).val
    return _segmentation_split(config, "val", mean, std, input_multiple)
