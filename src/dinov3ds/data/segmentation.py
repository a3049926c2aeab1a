"""Segmentation datasets: image/mask pairs of a folder layout (see `data.layout`), and ADE20K's classes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinov3ds.data.bad_samples import read_sample
from dinov3ds.data.io import load_image, load_mask
from dinov3ds.data.layout import SegmentationLayout, ade20k_layout, ade20k_split
from dinov3ds.errors import DataWarning, UserError

ImageLoader = Callable[[Path], "Image.Image | np.ndarray"]
PairTransform = Callable[["Image.Image | np.ndarray", np.ndarray], tuple[torch.Tensor, torch.Tensor]]

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# The standard ADE20K SceneParsing palette (as used by mmsegmentation), one RGB row per class above.
ADE20K_PALETTE: np.ndarray = np.array(
    [
        (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
        (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
        (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
        (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
        (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
        (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
        (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
        (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
        (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
        (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
        (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
        (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
        (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
        (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
        (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
        (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
        (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
        (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
        (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
        (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
        (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
        (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
        (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
        (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
        (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
        (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
        (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
        (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
        (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
        (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
    ],
    dtype=np.uint8,
)  # fmt: skip

_SHOWN = 5  # file names quoted in a one-line error before "and N more"


def _listing(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


class SegmentationFolderDataset(Dataset):
    """Image/mask pairs of one split of a `SegmentationLayout`, masks turned into class ids by its labels.

    Args:
        layout: where images and masks are and how mask values become class ids.
        split: subfolder of both, e.g. "train" or "validation".
        transform: called as transform(image, mask) -> (image tensor, int64 mask tensor).
        image_loader: reads one image (a PIL image or HxWx3 uint8 array); the medical module plugs in here.
        on_bad_sample: "error" stops on an image without a mask, a mask without an image, or a file that
            cannot be read; "warn" skips them with a warning.
    """

    def __init__(
        self,
        layout: SegmentationLayout,
        split: str,
        transform: PairTransform,
        *,
        image_loader: ImageLoader = load_image,
        on_bad_sample: Literal["error", "warn"] = "error",
    ) -> None:
        mask_root = layout.mask_folder(split)
        if not mask_root.is_dir():
            raise UserError(
                f"annotation folder {mask_root} not found; put the masks there or set annotations_dir"
            )
        self.transform = transform
        self.labels = layout.labels
        self.image_loader = image_loader
        self.samples = self._checked_pairs(layout, split, on_bad_sample)
        self.on_bad_sample = on_bad_sample

    @staticmethod
    def _checked_pairs(layout: SegmentationLayout, split: str, on_bad_sample: str) -> list[tuple[Path, Path]]:
        pairing = layout.pair(split)
        problems = []
        if pairing.images_without_mask:
            orphans = [image for image, _ in pairing.images_without_mask]
            problems.append(f"{len(orphans)} images without a mask ({_listing(orphans)})")
        if pairing.masks_without_image:
            problems.append(
                f"{len(pairing.masks_without_image)} masks without an image ({_listing(pairing.masks_without_image)})"
            )
        if problems:
            message = f"{'; '.join(problems)} in {layout.root}"
            if on_bad_sample == "error":
                raise UserError(f"{message}; add the missing files, or set data.on_bad_sample=warn to skip them")
            warnings.warn(f"{message}; skipping them", DataWarning, stacklevel=3)
        if not pairing.pairs:
            raise UserError(
                f"no image/mask pairs under {layout.image_folder(split)} and {layout.mask_folder(split)}; "
                "check root, split and mask_suffix"
            )
        return pairing.pairs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_sample(self._read, index, len(self.samples), self.on_bad_sample)

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        image = self.image_loader(image_path)
        mask = load_mask(mask_path)
        height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
        if mask.shape != (height, width):
            raise UserError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{width}x{height}; masks must match their image's size"
            )
        return self.transform(image, self.labels.prepare(mask, mask_path))


def ade20k_dataset(
    root: str | Path, split: str, transform: PairTransform, on_bad_sample: Literal["error", "warn"] = "error"
) -> SegmentationFolderDataset:
    """ADE20K SceneParsing (ADEChallengeData2016); `root` may be that folder or the folder holding it."""
    layout = ade20k_layout(root, len(ADE20K_CLASSES))
    return SegmentationFolderDataset(layout, ade20k_split(split), transform, on_bad_sample=on_bad_sample)
