"""Where a segmentation dataset's images and masks are, and how stored mask values become class ids.

One resolver for everything that reads such a dataset: training (`data.build`) and the up-front scan
(`commands.check_data`) pair files and process labels with the same code, so they can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinov3ds.data.io import find_images
from dinov3ds.errors import UserError

ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_SPLIT_ALIASES = {"train": "training", "val": "validation"}
_SHOWN = 5  # values quoted in a one-line error


@dataclass(frozen=True)
class MaskLabels:
    """Label processing, in order: `label_map` remaps stored values (e.g. {255: 1} for 0/255 binary masks),
    then `reduce_zero_label` turns 0 into `ignore_index` and shifts every other id down by one (ignore stays
    ignore). With `num_classes` set, any other value outside [0, num_classes) is an error naming the mask,
    instead of a failure deep inside the loss."""

    ignore_index: int = 255
    label_map: dict[int, int] = field(default_factory=dict)
    reduce_zero_label: bool = False
    num_classes: int | None = None

    def prepare(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """The class-id map of a mask as stored in `path`."""
        out = mask.copy()
        for stored, target in self.label_map.items():
            out[mask == stored] = target
        if self.reduce_zero_label:
            ignored = (out == 0) | (out == self.ignore_index)
            out = out - 1
            out[ignored] = self.ignore_index
        if self.num_classes is not None:
            bad = (out != self.ignore_index) & ((out < 0) | (out >= self.num_classes))
            if bad.any():
                values = sorted(set(np.unique(out[bad]).tolist()))[:_SHOWN]
                raise UserError(
                    f"mask {path} has label values {values} outside 0..{self.num_classes - 1} and ignore "
                    f"{self.ignore_index}; fix num_classes or set label_map / reduce_zero_label"
                )
        return out


@dataclass(frozen=True)
class Pairing:
    pairs: list[tuple[Path, Path]]  # (image, mask)
    images_without_mask: list[tuple[Path, Path]]  # (image, the mask path that was expected)
    masks_without_image: list[Path]


def pair_images_and_masks(image_root: Path, mask_root: Path, mask_suffix: str) -> Pairing:
    """Match each image to the mask at the same relative path (`<stem><mask_suffix>`); list both orphans.

    Masks may sit beside their images (a.jpg + a_mask.png): a file ending in the suffix is then no image.
    Hidden folders (.ipynb_checkpoints, .DS_Store) are not data.
    """
    images = find_images(image_root)
    if image_root == mask_root:
        images = [path for path in images if not path.name.endswith(mask_suffix)]
    pairs, orphans = [], []
    for image in images:
        relative = image.relative_to(image_root)
        mask = mask_root / relative.parent / (relative.stem + mask_suffix)
        (pairs if mask.is_file() else orphans).append((image, mask))
    used = {mask for _, mask in pairs}
    stray = sorted(
        path
        for path in mask_root.rglob(f"*{mask_suffix}")
        if path.is_file() and path not in used and not any(p.startswith(".") for p in path.relative_to(mask_root).parts)
    )
    return Pairing(pairs, orphans, stray)


@dataclass(frozen=True)
class SegmentationLayout:
    """A dataset root with `<images_dir>/<split>/**/<name>.<ext>` and masks at
    `<annotations_dir>/<split>/**/<name><mask_suffix>`."""

    root: Path
    images_dir: str = "images"
    annotations_dir: str = "annotations"
    mask_suffix: str = ".png"
    labels: MaskLabels = field(default_factory=MaskLabels)

    def image_folder(self, split: str) -> Path:
        return self.root / self.images_dir / split

    def mask_folder(self, split: str) -> Path:
        return self.root / self.annotations_dir / split

    def pair(self, split: str) -> Pairing:
        return pair_images_and_masks(self.image_folder(split), self.mask_folder(split), self.mask_suffix)


def ade20k_layout(root: str | Path, num_classes: int) -> SegmentationLayout:
    """ADE20K SceneParsing: `root` may be ADEChallengeData2016 or the folder holding it; 0 = other (ignored)."""
    root = Path(root)
    if (root / ADE20K_FOLDER).is_dir():
        root = root / ADE20K_FOLDER
    return SegmentationLayout(root, labels=MaskLabels(reduce_zero_label=True, num_classes=num_classes))


def ade20k_split(name: str) -> str:
    """ADE20K's own split name for `name` (train → training, val → validation), or an error."""
    split = ADE20K_SPLIT_ALIASES.get(name, name)
    if split not in ADE20K_SPLIT_ALIASES.values():
        raise UserError(f"ADE20K split {name!r} does not exist; use 'training' or 'validation'")
    return split
