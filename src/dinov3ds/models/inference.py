"""Segmentation inference strategies: whole image, sliding window and test-time augmentation.

Everything here is model-agnostic. A `logits_fn` maps a normalised batch [B, 3, h, w] (h, w multiples of
`multiple_of`, the backbone's patch size) to logits [B, K, h, w]; if it answers at a lower resolution the
logits are resized bilinearly to the input size.

    probs = run_inference(model, images, InferenceOptions(mode="slide", crop=512, stride=341), num_classes=150)
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3ds.data.transforms import round_to_multiple
from dinov3ds.errors import UserError
from dinov3ds.models.hardware import available_memory

LogitsFn = Callable[[Tensor], Tensor]
PROBABILITY_BUDGET = 1 << 30  # bytes of per-pixel class (or depth-bin) scores per forward: batches are split below it
MAX_PADDING = 64  # a slide window may cover at most this many times the image's area (the rest is padding)


def budget_slices(batch: Tensor, channels: int) -> list[slice]:
    """Slices of `batch` [B,3,H,W] whose per-pixel scores (`channels` float32 maps per image: class
    probabilities, depth bins) stay under PROBABILITY_BUDGET; an image over it goes alone."""
    per_image = channels * batch.shape[-2] * batch.shape[-1] * 4
    step = max(1, PROBABILITY_BUDGET // per_image)
    return [slice(start, start + step) for start in range(0, len(batch), step)]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v <= 0 for v in pair):
        raise UserError(f"{name}={value!r} must be a positive int or a pair of positive ints (height, width)")
    return pair


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def argmax_classes(scores: Tensor) -> Tensor:
    """[B,K,H,W] → [B,H,W] index of the largest score, the first on ties, as argmax. `max(...).indices`
    because argmax over a CPU tensor's channel dimension is ~6× slower (torch 2.14: 25 vs 4 ms for 3 classes
    at 375×500)."""
    return scores.max(dim=1).indices


def labels_at_size(probabilities: Tensor, size: tuple[int, int], max_band_elements: int = 1 << 24) -> Tensor:
    """Class probabilities [B,K,h,w] → labels [B,H,W] at `size`: resized as probabilities (bilinear,
    align_corners=False), then argmax, so a label boundary falls where the interpolated scores cross.

    The resize runs in bands of output rows holding at most `max_band_elements` values, so a 150-class map
    for a 24-megapixel photo never exists whole (14 GB): memory is the small input, one band and the labels.
    """
    batch, classes, height, width = probabilities.shape
    out_h, out_w = size
    if (height, width) == (out_h, out_w):
        return argmax_classes(probabilities)
    probabilities = probabilities.float()
    # PyTorch's bilinear source rows, computed as it does (float32): src = scale * (dst + 0.5) - 0.5, >= 0.
    scale = torch.tensor(height / out_h, dtype=torch.float32)
    source = (scale * (torch.arange(out_h, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    top = source.long().clamp(max=height - 1)
    bottom = (top + 1).clamp(max=height - 1)
    weight = (source - top).to(probabilities.device).view(1, 1, -1, 1)
    labels = torch.empty(batch, out_h, out_w, dtype=torch.long, device=probabilities.device)
    rows = max(1, max_band_elements // (batch * classes * out_w))
    for start in range(0, out_h, rows):
        band = slice(start, start + rows)
        w = weight[:, :, band]
        mixed = probabilities[:, :, top[band]] * (1 - w) + probabilities[:, :, bottom[band]] * w
        mixed = F.interpolate(mixed, size=(mixed.shape[2], out_w), mode="bilinear", align_corners=False)
        labels[:, band] = argmax_classes(mixed)
    return labels


@torch.no_grad()
def predict_whole(logits_fn: LogitsFn, images: Tensor, *, multiple_of: int = 16) -> Tensor:
    """Run the whole image in one pass; returns logits [B, K, H, W].

    A side that is not a multiple of `multiple_of` is *resized* (bilinear) to the nearest multiple and the
    logits are resized back, rather than padded: padding would put a band of zero (mean-colour) pixels into
    the model's view, while a resize of at most half a patch keeps the whole field of view natural.
    """
    height, width = images.shape[-2:]
    size = (round_to_multiple(height, multiple_of), round_to_multiple(width, multiple_of))
    return _resize(logits_fn(_resize(images, size)), (height, width))


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    # mmseg's grid: the last window ends exactly at the border, so no window runs past the image.
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(grids)]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_crop(images: Tensor, crop: tuple[int, int], num_classes: int, window_batch: int,
                accumulate: torch.device) -> None:  # fmt: skip
    """Refuse, before anything is allocated, a crop that would be nearly all padding around the image or whose
    buffers (sums and counts, the padded copy, one batch of windows and their logits) exceed free memory."""
    batch, _, height, width = images.shape
    (crop_h, crop_w), (pad_h, pad_w) = crop, (max(height, crop[0]), max(width, crop[1]))
    if crop_h * crop_w > MAX_PADDING * height * width:
        raise UserError(f"inference.crop {crop_h}x{crop_w} on a {height}x{width} image: a window would be more than "
                        f"{MAX_PADDING} times the image (nearly all padding); use a crop no larger than the image "
                        "(near data.image_size) or inference.mode whole")  # fmt: skip
    element = torch.promote_types(images.dtype, torch.float32).itemsize
    padded = batch * 3 * pad_h * pad_w * images.element_size() if (pad_h, pad_w) != (height, width) else 0
    windows = window_batch * (3 + num_classes) * crop_h * crop_w * element
    needs = {accumulate: (batch * num_classes + 1) * pad_h * pad_w * element}
    needs[images.device] = needs.get(images.device, 0) + padded + windows
    for device, size in needs.items():
        free = available_memory(device)
        if free is not None and size > free:
            raise UserError(f"inference.crop {crop_h}x{crop_w} on a {height}x{width} image needs at least "
                            f"{size / 2**30:.1f} GiB on {device} for its sliding-window buffers, {free / 2**30:.1f} GiB "
                            "is free; use a smaller inference.crop (near data.image_size) or inference.window_batch")  # fmt: skip


@torch.no_grad()
def predict_slide(
    logits_fn: LogitsFn,
    images: Tensor,
    *,
    crop: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int,
    window_batch: int = 8,
    multiple_of: int = 16,
    accumulate_device: torch.device | str | None = None,
) -> Tensor:
    """Sliding-window prediction as in mmseg; returns logits [B, K, H, W] averaged over overlapping windows.

    Windows (one crop of one image) go through `logits_fn` at most `window_batch` at a time and their logits
    are added into a sum buffer as they come, so memory grows with the image only through the [B, K, H, W]
    buffers; `accumulate_device="cpu"` keeps those in host memory when a huge image would not fit the GPU.
    An image smaller than the crop is zero-padded (bottom/right) up to the crop and the pad is cut away.
    """
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    if crop_h % multiple_of or crop_w % multiple_of:
        raise UserError(f"crop={crop!r} must be a multiple of {multiple_of} (the patch size); use e.g. 512")
    if stride_h > crop_h or stride_w > crop_w:
        raise UserError(
            f"stride={stride!r} is larger than crop={crop!r} and would leave gaps; use stride <= crop"
        )
    if window_batch < 1:
        raise UserError(f"window_batch={window_batch} must be at least 1")

    batch, _, height, width = images.shape
    pad_h, pad_w = max(height, crop_h), max(width, crop_w)
    device = torch.device(accumulate_device) if accumulate_device is not None else images.device
    dtype = torch.promote_types(images.dtype, torch.float32)
    positions = [
        (y, x)
        for y in _window_starts(pad_h, crop_h, stride_h)
        for x in _window_starts(pad_w, crop_w, stride_w)
    ]
    _check_crop(images, (crop_h, crop_w), num_classes, min(window_batch, batch * len(positions)), device)
    padding = (0, pad_w - width, 0, pad_h - height)
    padded = F.pad(images, padding) if any(padding) else images  # no full-size copy of a large image
    logit_sum = torch.zeros(batch, num_classes, pad_h, pad_w, dtype=dtype, device=device)
    count = torch.zeros(1, 1, pad_h, pad_w, dtype=dtype, device=device)
    for y, x in positions:
        count[..., y : y + crop_h, x : x + crop_w] += 1
    windows = [(b, y, x) for y, x in positions for b in range(batch)]
    for chunk in _chunks(windows, window_batch):
        crops = torch.stack([padded[b, :, y : y + crop_h, x : x + crop_w] for b, y, x in chunk])
        logits = _resize(logits_fn(crops), (crop_h, crop_w))
        if logits.shape[1] != num_classes:
            raise UserError(
                f"num_classes={num_classes} but the model returns {logits.shape[1]} classes; fix num_classes"
            )
        logits = logits.to(device=device, dtype=dtype)
        for (b, y, x), window_logits in zip(chunk, logits, strict=True):
            logit_sum[b, :, y : y + crop_h, x : x + crop_w] += window_logits
    return logit_sum.div_(count)[..., :height, :width]  # in place: a huge image's buffers are not doubled


@torch.no_grad()
def predict_tta(
    predict_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    flip: bool = False,
    scales: tuple[float, ...] = (1.0,),
    multiple_of: int = 16,
) -> Tensor:
    """Flip and multi-scale test-time augmentation; returns class *probabilities* [B, K, H, W].

    Like mmseg, the views are averaged as softmax probabilities, not logits. `predict_fn` maps images to
    logits (`predict_whole` or a `functools.partial` of `predict_slide`). At a scale other than 1 both sides
    are scaled (keeping the aspect ratio) and rounded to `multiple_of`; at scale 1 the image goes in as is.
    """
    if not scales or any(s <= 0 for s in scales):
        raise UserError(
            f"scales={scales!r} must be a non-empty list of positive factors, e.g. [0.75, 1.0, 1.25]"
        )
    height, width = images.shape[-2:]
    probs = None
    for scale in scales:
        size = (height, width)
        if scale != 1.0:
            size = (
                round_to_multiple(height * scale, multiple_of),
                round_to_multiple(width * scale, multiple_of),
            )
        scaled = _resize(images, size)
        views = [(scaled, False), (scaled.flip(-1), True)] if flip else [(scaled, False)]
        for view, flipped in views:
            logits = predict_fn(view)
            logits = logits.flip(-1) if flipped else logits
            view_probs = _resize(logits, (height, width)).softmax(dim=1)
            probs = view_probs if probs is None else probs + view_probs
    return probs.div_(len(scales) * (2 if flip else 1))  # in place; probs is this function's own buffer


@dataclass(frozen=True)
class InferenceOptions:
    """How a segmenter turns an image of any size into a label map."""

    mode: Literal["whole", "slide"] = "whole"  # one pass over the image, or overlapping crops
    crop: int | tuple[int, int] | None = None  # slide window size (multiple of the patch size)
    stride: int | tuple[int, int] | None = None  # slide step; None: two thirds of the crop (mmseg's 512/341)
    window_batch: int = 8  # slide windows per forward pass; bounds memory
    flip: bool = False  # also predict the horizontally flipped image
    scales: tuple[float, ...] = (1.0,)  # image scale factors for multi-scale TTA
    accumulate_device: str | None = None  # "cpu" keeps slide buffers off the GPU for huge images

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise UserError(f"inference mode {self.mode!r} is unknown; use 'whole' or 'slide'")
        if self.mode == "slide" and self.crop is None:
            raise UserError("inference mode 'slide' needs a crop size; set crop, e.g. 512")


def run_inference(logits_fn: LogitsFn, images: Tensor, options: InferenceOptions, num_classes: int) -> Tensor:
    """Predict class probabilities [B, K, H, W] for `images` with the strategy `options` describes.

    Always probabilities (a softmax of the logits without TTA) so callers get the same kind of output
    whichever options are set; the argmax is the same as that of the logits.
    """
    if options.mode == "slide":
        crop_h, crop_w = _pair(options.crop, "crop")
        stride = (
            options.stride
            if options.stride is not None
            else (max(crop_h * 2 // 3, 1), max(crop_w * 2 // 3, 1))
        )

        def predict(batch: Tensor) -> Tensor:
            return predict_slide(
                logits_fn,
                batch,
                crop=(crop_h, crop_w),
                stride=stride,
                num_classes=num_classes,
                window_batch=options.window_batch,
                accumulate_device=options.accumulate_device,
            )
    else:

        def predict(batch: Tensor) -> Tensor:
            return predict_whole(logits_fn, batch)

    return predict_tta(predict, images, flip=options.flip, scales=options.scales)
