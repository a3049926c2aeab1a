"""Depth datasets: `ROOT/<split>/images/*` with `ROOT/<split>/depth/<stem>.png` (16-bit, millimetres, 0 = invalid)
or `<stem>.npy` (float metres), and the transforms that keep metric depth right.

Training augmentation changes no depth value: an optional fixed box first (NYU's white border off, as Meta's
NYUCrop), a random crop of height x width (padded with invalid depth where the image is smaller), a horizontal
flip, and colour jitter on the image alone; no resize, which would change the apparent distance of everything in
view. Evaluation resizes the image to a patch multiple but scores at the ground truth's own size (the prediction
is resized, never the depth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dinov3ds.data.io import find_images, load_image
from dinov3ds.data.transforms import PhotoMetricDistortion, SegmentationEvalTransform, Stats, _to_float
from dinov3ds.errors import UserError

DEPTH_SUFFIXES = (".png", ".npy")
# Meta's NYUCrop (dinov3/eval/depth/transforms.py, 6876159): the box (x1, y1, x2, y2) of NYU's 640x480 frame
# that holds picture, not white border; other frame sizes get it scaled, as there.
NYU_BOX, NYU_FRAME = (43, 45, 608, 472), (640, 480)


def load_depth(path: Path, scale: float | None = None) -> np.ndarray:
    """Depth in metres (float32, 0 = unknown): a 16-bit PNG divided by `scale` (default 1000: millimetres), a
    .npy of floats divided by `scale` (default 1: metres). An 8-bit PNG holds no usable depth: refused."""
    if path.suffix.lower() == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"depth file {path} cannot be read ({error}); write it with numpy.save") from None
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.number):
            raise UserError(f"depth file {path} holds {values.dtype} of shape {values.shape}; save one HxW array of metres")
        return (values.astype(np.float32) / (scale or 1.0)).clip(min=0)
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.asarray(image)
    except OSError as error:
        raise UserError(f"depth file {path} cannot be read ({error}); replace it with a 16-bit PNG") from None
    if mode not in ("I;16", "I;16B", "I;16L", "I") or values.ndim != 2:
        raise UserError(f"depth file {path} is an {mode} PNG, not 16-bit: depth PNGs hold millimetres in 16 bits "
                        "(0 = unknown); save it as uint16, or as a .npy of metres")  # fmt: skip
    return values.astype(np.float32) / (scale or 1000.0)


def pair_depth_files(root: Path, split: str, images_dir: str = "images",
                     depth_dir: str = "depth") -> tuple[list[tuple[Path, Path]], list[str]]:  # fmt: skip
    """(image, depth file) per image of `root/split/images`, and one line per image without its depth file
    (`check-data` lists them all; training stops at the first)."""
    images = find_images(root / split / images_dir)
    if not images:
        raise UserError(f"no images under {root / split / images_dir}; check data.root and the split names")
    pairs, missing = [], []
    for image in images:
        relative = image.relative_to(root / split / images_dir).with_suffix("")
        found = [root / split / depth_dir / f"{relative}{suffix}" for suffix in DEPTH_SUFFIXES]
        found = [path for path in found if path.is_file()]
        if found:
            pairs.append((image, found[0]))
        else:
            missing.append(f"image {image} has no depth file {root / split / depth_dir / relative}.png (or .npy); "
                           "add it or remove the image")  # fmt: skip
    return pairs, missing


def depth_pairs(root: Path, split: str, images_dir: str = "images", depth_dir: str = "depth") -> list[tuple[Path, Path]]:
    """(image, depth file) per image of `root/split/images`, or a one-line error naming a missing depth file."""
    pairs, missing = pair_depth_files(root, split, images_dir, depth_dir)
    if missing:
        raise UserError(missing[0])
    return pairs


def check_depth_size(depth: np.ndarray, width: int, height: int, depth_path: Path, image_path: Path) -> None:
    """A depth map scores the pixels of its own image: another size is refused, never resized."""
    if depth.shape != (height, width):
        raise UserError(f"depth file {depth_path} is {depth.shape[1]}x{depth.shape[0]} but image {image_path} is "
                        f"{width}x{height}; depth maps must match their image's size")  # fmt: skip


def nyu_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of NYU_BOX in a height x width frame, scaled and rounded down as Meta's NYUCrop."""
    x1, y1, x2, y2 = NYU_BOX
    frame_w, frame_h = NYU_FRAME
    return int(y1 / frame_h * height), int(y2 / frame_h * height), int(x1 / frame_w * width), int(x2 / frame_w * width)


class DepthTrainTransform:
    """Optional NYU box, random crop to `size` (a side, or height x width; padding with invalid depth), horizontal
    flip, photometric jitter, normalise."""

    def __init__(self, size: int | tuple[int, int], mean: Stats, std: Stats, augment: bool = True,
                 fixed_crop: str = "full") -> None:  # fmt: skip
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.augment, self.fixed_crop = augment, fixed_crop
        self.normalize = v2.Compose(_to_float(mean, std))
        self.photometric = PhotoMetricDistortion()

    def __call__(self, image: Image.Image, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        picture = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        target = torch.from_numpy(depth)
        if self.fixed_crop == "nyu":
            top, bottom, left, right = nyu_box(*target.shape)
            picture, target = picture[:, top:bottom, left:right], target[top:bottom, left:right]
        (crop_h, crop_w), (height, width) = self.size, target.shape
        pad_h, pad_w = max(0, crop_h - height), max(0, crop_w - width)
        if pad_h or pad_w:
            picture = torch.nn.functional.pad(picture, (0, pad_w, 0, pad_h))
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h))  # 0 = invalid: never scored
        height, width = target.shape
        top = int(torch.randint(0, height - crop_h + 1, ())) if self.augment else (height - crop_h) // 2
        left = int(torch.randint(0, width - crop_w + 1, ())) if self.augment else (width - crop_w) // 2
        picture = picture[:, top : top + crop_h, left : left + crop_w]
        target = target[top : top + crop_h, left : left + crop_w]
        if self.augment and torch.rand(()) < 0.5:
            picture, target = picture.flip(-1), target.flip(-1)
        if self.augment:
            picture = self.photometric(picture)
        return self.normalize(picture.contiguous()).as_subclass(torch.Tensor), target.contiguous()


class DepthEvalTransform:
    """The segmentation eval transform for the image; the depth map untouched (scored at its own size)."""

    def __init__(self, size: int | None, mean: Stats, std: Stats, multiple_of: int = 16) -> None:
        self.image = SegmentationEvalTransform(size, mean, std, multiple_of=multiple_of)

    def __call__(self, image: Image.Image, depth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(image)[0], torch.from_numpy(depth)


class DepthFolderDataset(Dataset):
    """One split of a depth folder: (normalised image, depth in metres [H, W]) pairs."""

    def __init__(self, root: str | Path, split: str, transform, *, scale: float | None = None,
                 images_dir: str = "images", depth_dir: str = "depth") -> None:  # fmt: skip
        self.samples = depth_pairs(Path(root), split, images_dir, depth_dir)
        self.transform, self.scale = transform, scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, depth_path = self.samples[index]
        image, depth = load_image(image_path), load_depth(depth_path, self.scale)
        check_depth_size(depth, image.width, image.height, depth_path, image_path)
        return self.transform(image, depth)


def depth_splits(config, mean: Stats, std: Stats, input_multiple: int, *, train: bool = True):
    """(train, val) datasets of a depth_folder / nyu config (train None when not asked for)."""
    data, depth = config.data, config.depth
    folder = {"scale": depth.depth_scale, "images_dir": data.images_dir, "depth_dir": depth.depth_dir}
    val = DepthFolderDataset(data.root, data.val_split, DepthEvalTransform(data.eval_size, mean, std, input_multiple), **folder)
    if not train:
        return None, val
    crop = tuple(side - side % input_multiple or input_multiple for side in depth.train_crop or (data.image_size,) * 2)
    transform = DepthTrainTransform(crop, mean, std, data.augment, depth.train_fixed_crop)
    return DepthFolderDataset(data.root, data.train_split, transform, **folder), val
