"""Image-classification folders shaped like ImageNette: `root/<split>/<class>/*.jpg`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from dinov3ds.data.bad_samples import read_sample
from dinov3ds.data.io import find_images, load_image
from dinov3ds.errors import DataWarning, UserError

IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}


class ImageFolderDataset(Dataset):
    """One split of a class-per-folder dataset.

    Class indices come from the sorted folder names, so train and val agree as long as both hold the same
    folders. With on_bad_sample="warn" an empty class folder keeps its index (so indices never shift
    between splits) but contributes no samples, and an unreadable image is skipped with a warning.

    Attributes:
        samples: (image path, class index) pairs, sorted by class then path.
        classes: folder names, in index order.
        class_names: human-readable names where `class_names` maps a folder, else the folder name.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor],
        class_names: dict[str, str] | None = None,
        on_bad_sample: Literal["error", "warn"] = "error",
    ) -> None:
        folder = Path(root) / split
        if not folder.is_dir():
            raise UserError(f"split folder {folder} not found; expected {folder}/<class>/<image files>")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise UserError(
                f"split folder {folder} has no class subfolders; put each class's images in its own folder"
            )
        names = class_names or {}
        self.class_names = [names.get(name, name) for name in self.classes]
        unnamed = [name for name in self.classes if class_names and name not in names]
        if unnamed:
            warnings.warn(
                f"{folder}: class folders {', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''} have no "
                "name in the built-in table and keep their folder names; set data.class_names to name them",
                DataWarning, stacklevel=2,
            )  # fmt: skip
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            images = find_images(folder / name)
            if not images:
                message = f"class folder {folder / name} has no images; add images or remove the folder"
                if on_bad_sample == "error":
                    raise UserError(f"{message} (or set data.on_bad_sample=warn to skip it)")
                warnings.warn(f"{message}; skipping it (its class index is kept)", DataWarning, stacklevel=2)
            self.samples.extend((path, index) for path in images)
        if not self.samples:
            raise UserError(f"split folder {folder} contains no images; check the dataset root")
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return read_sample(self._read, index, len(self.samples), self.on_bad_sample)

    def _read(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label
