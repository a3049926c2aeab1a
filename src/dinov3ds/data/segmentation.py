"""Semantic-segmentation folders (images + id masks at the same relative path) and ADE20K.

Layout: `root/<images_dir>/<split>/**/<name>.<ext>` with its mask at
`root/<annotations_dir>/<split>/**/<name><mask_suffix>`.
"""

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
from dinov3ds.data.io import find_images, load_image, load_mask
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
    """Image/mask pairs from a folder tree, with the label fixes real datasets need.

    Label processing, in order: `label_map` remaps stored values (e.g. {255: 1} for 0/255 binary masks),
    then `reduce_zero_label` turns 0 into ignore_index and shifts every other id down by one (ignore stays
    ignore). With `num_classes` set, any other value outside [0, num_classes) is reported as a user error
    naming the mask, instead of failing later inside the loss.

    Args:
        root: dataset root holding `images_dir` and `annotations_dir`.
        split: subfolder of both, e.g. "train" or "validation".
        transform: called as transform(image, mask) -> (image tensor, int64 mask tensor).
        image_loader: reads one image (a PIL image or HxWx3 uint8 array); the medical module plugs in here.
        on_bad_sample: "error" stops on an image without a mask, a mask without an image, or a file that
            cannot be read; "warn" skips them with a warning.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: PairTransform,
        *,
        images_dir: str = "images",
        annotations_dir: str = "annotations",
        mask_suffix: str = ".png",
        ignore_index: int = 255,
        label_map: dict[int, int] | None = None,
        reduce_zero_label: bool = False,
        num_classes: int | None = None,
        image_loader: ImageLoader = load_image,
        on_bad_sample: Literal["error", "warn"] = "error",
    ) -> None:
        image_root = Path(root) / images_dir / split
        mask_root = Path(root) / annotations_dir / split
        if not mask_root.is_dir():
            raise UserError(
                f"annotation folder {mask_root} not found; put the masks there or set annotations_dir"
            )
        self.transform = transform
        self.ignore_index = ignore_index
        self.label_map = dict(label_map or {})
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes
        self.image_loader = image_loader
        self.samples = self._pair(image_root, mask_root, mask_suffix, on_bad_sample)
        self.on_bad_sample = on_bad_sample

    @staticmethod
    def _pair(image_root: Path, mask_root: Path, suffix: str, on_bad_sample: str) -> list[tuple[Path, Path]]:
        """Match each image to its mask by relative path; report both kinds of orphan."""
        pairs, orphans = [], []
        images = find_images(image_root)
        if image_root == mask_root:  # masks stored beside their images, e.g. a.jpg + a_mask.png
            images = [path for path in images if not path.name.endswith(suffix)]
        for image in images:
            relative = image.relative_to(image_root)
            mask = mask_root / relative.parent / (relative.stem + suffix)
            (pairs if mask.is_file() else orphans).append((image, mask))
        used = {mask for _, mask in pairs}
        stray = sorted(
            path
            for path in mask_root.rglob(f"*{suffix}")
            if path.is_file()
            and path not in used
            and not any(p.startswith(".") for p in path.relative_to(mask_root).parts)
        )
        problems = []
        if orphans:
            problems.append(f"{len(orphans)} images without a mask ({_listing([i for i, _ in orphans])})")
        if stray:
            problems.append(f"{len(stray)} masks without an image ({_listing(stray)})")
        if problems:
            message = f"{'; '.join(problems)} in {image_root.parent.parent}"
            if on_bad_sample == "error":
                raise UserError(f"{message}; add the missing files, or set data.on_bad_sample=warn to skip them")
            warnings.warn(f"{message}; skipping them", DataWarning, stacklevel=3)
        if not pairs:
            raise UserError(
                f"no image/mask pairs under {image_root} and {mask_root}; check root, split and mask_suffix"
            )
        return pairs

    def __len__(self) -> int:
        return len(self.samples)

    def prepare_mask(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """Apply label_map and reduce_zero_label to a mask as stored in `path`."""
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
        return self.transform(image, self.prepare_mask(mask, mask_path))


def ade20k_dataset(
    root: str | Path, split: Literal["training", "validation"], transform: PairTransform,
    on_bad_sample: Literal["error", "warn"] = "error",
) -> SegmentationFolderDataset:
    """ADE20K SceneParsing (ADEChallengeData2016); `root` may be that folder or the folder holding it."""
    if split not in ("training", "validation"):
        raise UserError(f"ADE20K split {split!r} does not exist; use 'training' or 'validation'")
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    return SegmentationFolderDataset(
        root, split, transform, reduce_zero_label=True, num_classes=len(ADE20K_CLASSES), on_bad_sample=on_bad_sample
    )
