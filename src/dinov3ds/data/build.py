"""From a config's `data` section to train/val datasets with the right transforms and class names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from dinov3ds.config import Config
from dinov3ds.data.classification import IMAGENETTE_CLASSES, ImageFolderDataset
from dinov3ds.data.io import load_image
from dinov3ds.data.medical import load_mri_slice
from dinov3ds.data.segmentation import ADE20K_CLASSES, SegmentationFolderDataset, ade20k_dataset
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


def _classification(config: Config, mean: Stats, std: Stats) -> DataSplits:
    data = config.data
    size = data.image_size
    evaluation = classification_eval_transform(size, mean, std)
    training = classification_train_transform(size, mean, std) if data.augment else evaluation
    mapping = IMAGENETTE_CLASSES if data.dataset == "imagenette" else None
    options = {"class_names": mapping, "on_bad_sample": data.on_bad_sample}
    train = ImageFolderDataset(data.root, data.train_split, training, **options)
    val = ImageFolderDataset(data.root, data.val_split, evaluation, **options)
    if train.classes != val.classes:
        raise UserError(
            f"{data.root}: train and val class folders differ ({sorted(set(train.classes) ^ set(val.classes))}); "
            "both splits need the same class folders"
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
        return partial(load_mri_slice, options=config.data.medical)
    return load_image


def _segmentation(config: Config, mean: Stats, std: Stats, input_multiple: int) -> DataSplits:
    data = config.data
    names = segmentation_class_names(config)
    training = SegmentationTrainTransform(
        data.image_size,
        mean,
        std,
        scale_range=tuple(data.scale_range) if data.augment else (1.0, 1.0),
        base_size=data.base_size,
        ignore_index=data.ignore_index,
        photometric=data.photometric and data.augment,
        hflip=data.augment,
    )
    evaluation = SegmentationEvalTransform(data.eval_size, mean, std, multiple_of=input_multiple)
    if data.dataset == "ade20k":
        splits = (data.train_split, data.val_split)
        if splits == ("train", "val"):
            splits = ("training", "validation")
        return DataSplits(
            ade20k_dataset(data.root, splits[0], training, on_bad_sample=data.on_bad_sample),
            ade20k_dataset(data.root, splits[1], evaluation, on_bad_sample=data.on_bad_sample),
            names,
        )
    options = {
        "images_dir": data.images_dir,
        "annotations_dir": data.annotations_dir,
        "mask_suffix": data.mask_suffix,
        "ignore_index": data.ignore_index,
        "label_map": data.label_map,
        "reduce_zero_label": data.reduce_zero_label,
        "num_classes": len(names),
        "image_loader": image_loader(config),
        "on_bad_sample": data.on_bad_sample,
    }
    train = SegmentationFolderDataset(data.root, data.train_split, training, **options)
    val = SegmentationFolderDataset(data.root, data.val_split, evaluation, **options)
    return DataSplits(train, val, names)


def build_datasets(config: Config, mean: Stats, std: Stats, input_multiple: int = 16) -> DataSplits:
    """Datasets for the config's task; `mean`/`std` come from the backbone's preset."""
    if not Path(config.data.root).exists():
        raise UserError(
            f"data.root {config.data.root} does not exist; download a dataset (dinov3ds download ...) "
            "or point data.root at your folder"
        )
    if config.task == "classification":
        return _classification(config, mean, std)
    return _segmentation(config, mean, std, input_multiple)
