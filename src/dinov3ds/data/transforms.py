"""Train and eval transforms for classification and segmentation (torchvision transforms.v2).

Segmentation masks travel as `tv_tensors.Mask`, so every geometric op v2 applies to them uses nearest
interpolation and never invents a label that was not in the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Stats = Sequence[float]


def _to_float(mean: Stats, std: Stats) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def classification_train_transform(size: int, mean: Stats, std: Stats) -> v2.Compose:
    """The standard linear-probe augmentation: random resized crop and horizontal flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_float(mean, std),
        ]
    )


def image_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """[C,H,W] pixels as torchvision's `to_image` gives them (same values, same resize results) without its
    copies: a view of the array, or of `np.asarray`'s one copy of a PIL image (read-only: only ever read)."""
    if isinstance(image, torch.Tensor):
        return _plain(image)
    with warnings.catch_warnings():  # "not writable": nothing writes into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.atleast_3d(np.asarray(image))).permute(2, 0, 1)


class ClassificationEvalTransform:
    """Resize the shorter side to size / crop_ratio, then centre-crop: the usual ImageNet eval protocol, on
    uint8 pixels, float only at the crop's size. `prepare` takes a picture at any scale of the original whose
    `resize_size` it is given (a JPEG decoded at reduced scale): the size follows the original."""

    def __init__(self, size: int, mean: Stats, std: Stats, crop_ratio: float = 224 / 256) -> None:
        self.size = size
        self.shorter = round(size / crop_ratio)
        self.normalize = v2.Compose(_to_float(mean, std))

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) before the crop, as torchvision's Resize(int) has it (longer side truncated)."""
        if width <= height:
            return int(self.shorter * height / width), self.shorter
        return self.shorter, int(self.shorter * width / height)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size, self.size

    def prepare(self, picture: torch.Tensor, resize_to: tuple[int, int]) -> torch.Tensor:
        """[3,h,w] uint8 → normalised [3,size,size] float."""
        resized = F.resize(picture, list(resize_to), antialias=True)
        return _plain(self.normalize(F.center_crop(resized, [self.size, self.size])))

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        picture = image_tensor(image)
        return self.prepare(picture, self.resize_size(*picture.shape[-2:]))

    def __repr__(self) -> str:  # the feature store's key holds it: the same settings give the same text
        return f"ClassificationEvalTransform(size={self.size}, shorter={self.shorter}, normalize={self.normalize!r})"


def classification_eval_transform(
    size: int, mean: Stats, std: Stats, crop_ratio: float = 224 / 256
) -> ClassificationEvalTransform:
    """Resize the shorter side to size / crop_ratio, then centre-crop (see ClassificationEvalTransform)."""
    return ClassificationEvalTransform(size, mean, std, crop_ratio)


def round_to_multiple(size: float, multiple_of: int) -> int:
    """The nearest multiple of `multiple_of` (at least one); ties round up, unlike Python's round(), which
    would send 40 to 32 but 56 to 64 (half to even). Every resize to a patch multiple uses this one rule."""
    return max(multiple_of, int(size / multiple_of + 0.5) * multiple_of)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """Drop the tv_tensor subclass so callers (collate, losses) see ordinary tensors."""
    return tensor.as_subclass(torch.Tensor)


def _uniform(low: float, high: float) -> float:
    # torch's RNG, not numpy's: DataLoader seeds torch differently in each worker.
    return low + (high - low) * torch.rand(()).item()


def _randint(high_inclusive: int) -> int:
    return int(torch.randint(0, high_inclusive + 1, ()).item())


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """[3,H,W] RGB in 0-255 → H in [0, 1), S in [0, 1], V in 0-255 (the HSV OpenCV uses, H rescaled)."""
    maximum, _ = rgb.max(dim=0)
    minimum, _ = rgb.min(dim=0)
    delta = maximum - minimum
    r, g, b = rgb
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maximum == r, ((g - b) / safe) % 6, torch.where(maximum == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(maximum > 0, delta / torch.where(maximum > 0, maximum, torch.ones_like(maximum)), torch.zeros_like(maximum))
    return torch.stack([hue, saturation, maximum])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    sector = hue * 6
    index = sector.floor() % 6
    fraction = sector - sector.floor()
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    channels = []
    for channel in range(3):
        out = torch.zeros_like(value)
        for k, choice in enumerate(choices):
            out = torch.where(index == k, choice[channel], out)
        channels.append(out)
    return torch.stack(channels)


class PhotoMetricDistortion:
    """mmsegmentation's PhotoMetricDistortion, the ADE20K protocol's colour augmentation, on [3,H,W] uint8-range
    images: each step with probability 1/2 and the image rounded down to 8 bits after it, as mmseg does:
    brightness + U(-32, 32), contrast × U(0.5, 1.5) (before or after the HSV steps, at random), saturation ×
    U(0.5, 1.5) and hue + U(-18, 18) of 180 in HSV."""

    def __call__(self, picture: torch.Tensor) -> torch.Tensor:
        def keep_8_bits(image: torch.Tensor) -> torch.Tensor:
            return image.clamp(0, 255).floor()

        image = picture.float()
        if _randint(1):
            image = keep_8_bits(image + _uniform(-32, 32))
        contrast_first = bool(_randint(1))
        if contrast_first and _randint(1):
            image = keep_8_bits(image * _uniform(0.5, 1.5))
        if _randint(1):
            hsv = _rgb_to_hsv(image)
            hsv[1] = (hsv[1] * _uniform(0.5, 1.5)).clamp(0, 1)
            image = keep_8_bits(_hsv_to_rgb(hsv))
        if _randint(1):
            hsv = _rgb_to_hsv(image)
            hsv[0] = (hsv[0] + (_randint(36) - 18) / 180) % 1
            image = keep_8_bits(_hsv_to_rgb(hsv))
        if not contrast_first and _randint(1):
            image = keep_8_bits(image * _uniform(0.5, 1.5))
        return image.to(torch.uint8)


def _focused_box(labels: torch.Tensor, crop: tuple[int, int], focus: int) -> tuple[int, int] | None:
    """A crop holding a pixel of class `focus` drawn uniformly, at a uniform offset around it (nnU-Net's forced
    foreground); None when the class is not in `labels` (a resize can drop a one-pixel structure)."""
    found = torch.nonzero(labels.as_subclass(torch.Tensor) == focus)
    if not len(found):
        return None
    y, x = (int(v) for v in found[_randint(len(found) - 1)][-2:])
    height, width = labels.shape[-2:]
    corner = []
    for position, side, crop_side in ((y, height, crop[0]), (x, width, crop[1])):
        low, high = max(0, position - crop_side + 1), min(position, max(side - crop_side, 0))
        corner.append(low + _randint(high - low))
    return corner[0], corner[1]


def _crop_box(labels: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float, ignore_index: int) -> tuple[int, int]:
    """mmseg's RandomCrop: up to 10 draws until no class covers `cat_max_ratio` or more of the crop's labelled
    pixels (and at least two classes are in it); the last draw otherwise."""
    height, width = labels.shape[-2:]
    crop_h, crop_w = crop
    if cat_max_ratio >= 1:  # no constraint: one draw
        return _randint(max(height - crop_h, 0)), _randint(max(width - crop_w, 0))
    for _ in range(10):
        top, left = _randint(max(height - crop_h, 0)), _randint(max(width - crop_w, 0))
        window = labels[..., top : top + crop_h, left : left + crop_w]
        counts = torch.bincount(window[window != ignore_index].flatten().long())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


class SegmentationTrainTransform:
    """mmseg-style segmentation training augmentation for an (image, mask) pair.

    Order: random resize (shorter side = base_size x a ratio drawn from scale_range, aspect kept), random
    rotation (medical slices), random crop of at most crop_size (around a pixel of class `focus` when a
    sampler sets it), horizontal and vertical flips, photometric distortion (image only), normalise, then pad
    bottom/right up to crop_size. As in mmseg the image is padded *after* normalisation with 0 (the mean
    colour) and the mask with ignore_index, so padding never counts in the loss.

    Args:
        crop_size: output size, an int or (height, width).
        mean, std: normalisation statistics of the backbone.
        scale_range: range of the random resize ratio.
        base_size: shorter side before the ratio; defaults to the crop's shorter side (ADE20K's mmseg scale
            (2048, 512) with crop 512 is base_size=512).
        ignore_index: label of padded pixels.
        photometric: mmseg's PhotoMetricDistortion on the image (8-bit, before normalisation).
        hflip: random horizontal flip.
        cat_max_ratio: re-draw a crop (up to 10 times) while one class covers this share of it or more
            (mmseg's RandomCrop; the ADE20K protocol uses 0.75; 1 draws once).
        rotation, rotation_probability: rotate by an angle drawn from +-rotation degrees, with this probability
            (nnU-Net's 2D augmentation: 180 and 0.2); the canvas grows to hold the whole slice, the new corners
            are black and ignore_index.
        vflip: random vertical flip too (nnU-Net mirrors both in-plane axes).
    """

    focus: int | None = None  # set per sample by `data.sampling.ForegroundOversampling`

    def __init__(
        self,
        crop_size: int | Sequence[int],
        mean: Stats,
        std: Stats,
        *,
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: int | None = None,
        ignore_index: int = 255,
        photometric: bool = True,
        hflip: bool = True,
        cat_max_ratio: float = 1.0,
        rotation: float = 0.0,
        rotation_probability: float = 0.0,
        vflip: bool = False,
    ) -> None:
        self.crop_size = _pair(crop_size)
        self.base_size = base_size if base_size is not None else min(self.crop_size)
        self.scale_range = scale_range
        self.ignore_index = ignore_index
        self.hflip = hflip
        self.cat_max_ratio = cat_max_ratio
        self.rotation, self.rotation_probability, self.vflip = rotation, rotation_probability, vflip
        self.distortion = PhotoMetricDistortion() if photometric else None
        self.normalize = v2.Compose(_to_float(mean, std))

    def __call__(
        self, image: Image.Image | np.ndarray, mask: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        picture = v2.functional.to_image(image)
        labels = tv_tensors.Mask(torch.as_tensor(np.asarray(mask), dtype=torch.int64))

        height, width = picture.shape[-2:]
        ratio = _uniform(*self.scale_range)
        scale = self.base_size * ratio / min(height, width)
        new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
        picture = F.resize(picture, new_size, antialias=True)
        labels = F.resize(labels, new_size)
        if self.rotation and torch.rand(()).item() < self.rotation_probability:
            angle = _uniform(-self.rotation, self.rotation)
            picture = F.rotate(picture, angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True, fill=0)
            labels = F.rotate(labels, angle, expand=True, fill=self.ignore_index)

        crop_h, crop_w = self.crop_size
        height, width = labels.shape[-2:]
        focused = _focused_box(labels, self.crop_size, self.focus) if self.focus is not None else None
        top, left = focused or _crop_box(labels, self.crop_size, self.cat_max_ratio, self.ignore_index)
        picture = F.crop(picture, top, left, min(crop_h, height), min(crop_w, width))
        labels = F.crop(labels, top, left, min(crop_h, height), min(crop_w, width))

        if self.hflip and torch.rand(()).item() < 0.5:
            picture, labels = F.horizontal_flip(picture), F.horizontal_flip(labels)
        if self.vflip and torch.rand(()).item() < 0.5:
            picture, labels = F.vertical_flip(picture), F.vertical_flip(labels)
        if self.distortion is not None:
            picture = self.distortion(picture)
        picture = self.normalize(picture)

        pad = [0, 0, crop_w - picture.shape[-1], crop_h - picture.shape[-2]]
        picture = F.pad(picture, pad, fill=0.0)
        labels = F.pad(labels, pad, fill=self.ignore_index)
        return _plain(picture), _plain(labels)


class SegmentationEvalTransform:
    """Deterministic eval transform: image ready for a patch-16 backbone, mask left untouched.

    The image's shorter side is resized to `size` (None keeps it), then each side is resized to the
    nearest multiple of `multiple_of` (a slight aspect change of at most half a patch per side, instead of
    padding that the caller would have to crop away), antialiased on uint8 pixels (torchvision's kernel, about
    5x PIL's bilinear) before the float conversion. The mask is returned at its ORIGINAL resolution so
    metrics are computed at the label's native size; the caller resizes logits to the mask's size.
    `mask` may be None (inference), in which case None is returned in its place.
    """

    def __init__(self, size: int | None, mean: Stats, std: Stats, multiple_of: int = 16) -> None:
        self.size = size
        self.multiple_of = multiple_of
        self.normalize = v2.Compose(_to_float(mean, std))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the image is resized to; exposed so inference can undo it."""
        if self.size is not None:
            scale = self.size / min(height, width)
            height, width = height * scale, width * scale
        return round_to_multiple(height, self.multiple_of), round_to_multiple(width, self.multiple_of)

    resize_size = output_size  # no crop: the resize is the output

    def prepare(self, picture: torch.Tensor, resize_to: tuple[int, int]) -> torch.Tensor:
        """[3,h,w] uint8 (any scale of the original `resize_to` was computed from) → normalised float."""
        return _plain(self.normalize(F.resize(picture, list(resize_to), antialias=True)))

    def __call__(
        self, image: Image.Image | np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        picture = image_tensor(image)
        picture = self.prepare(picture, self.output_size(*picture.shape[-2:]))
        labels = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.int64)
        return picture, labels

    def image_only(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """The transformed image alone (inference has no mask); a bound method, so loader workers can pickle it."""
        return self(image)[0]


def denormalize(tensor: torch.Tensor, mean: Stats, std: Stats) -> np.ndarray:
    """Undo normalisation of a [3, H, W] tensor into an HxWx3 uint8 array for plots and overlays."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
