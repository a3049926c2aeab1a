"""3D volume prediction in slice batches, along one axis or averaged over several.

`predict_volume` knows nothing about models: it hands uint8 slice batches [B, H, W, 3] to a
`predict_slices` callable (the segmenter's, in `dinov3ds.commands.volumes`) and gets class probabilities
[B, K, H, W] back. Slices are made by `data.volume_slices.slice_image`, the function training slices come
from, and resampled in-plane to `target_spacing` and back exactly as training resampled them.

Memory along one axis: the input, the label volume and one batch, whatever the depth (a batch of sagittal
or coronal slices holds as many pixels as `batch_size` axial ones). Averaging over several axes (or
returning probabilities) adds one float32 [K, X, Y, Z] accumulator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data.volume_slices import channel_ranges, in_plane_size, resample, slice_image
from dinov3ds.errors import UserError

SlicePredictor = Callable[[np.ndarray], np.ndarray]
ARGMAX_CHUNK = 16


def _checked(channels: np.ndarray) -> np.ndarray:
    if channels.ndim == 3:
        channels = channels[None]
    if channels.ndim != 4:
        raise UserError(f"expected a 3D volume (or channels x 3D), got shape {channels.shape}")
    return channels


def _back_to(probabilities: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, K, h, w] → [B, K, H, W] (bilinear on probabilities, as labels_at_size does for photos)."""
    if tuple(probabilities.shape[-2:]) == tuple(size):
        return probabilities
    tensor = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False).numpy()


def _slices_per_batch(batch_size: int, shape: Sequence[int], axis: int) -> int:
    """`batch_size` counts axial (axis 2) slices; along axes 0 and 1 a slice spans the depth, so the batch
    holds as many pixels instead, and memory stays flat however deep the volume is."""
    axial = shape[0] * shape[1]
    area = np.prod([n for i, n in enumerate(shape) if i != axis])
    return max(1, int(batch_size * axial // area))


def predict_volume(
    channels: np.ndarray,
    predict_slices: SlicePredictor,
    *,
    options: SlicePreprocessing,
    num_classes: int,
    axes: Sequence[int] = (2,),
    zooms: Sequence[float] | None = None,
    batch_size: int = 16,
    with_probabilities: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (uint8, the volume's shape) and, if asked, class probabilities (float32 [K, X, Y, Z], the mean
    over `axes`) of a volume [X, Y, Z] or channels [C, X, Y, Z], predicted slice by slice."""
    channels = _checked(channels)
    if not axes or any(axis not in (0, 1, 2) for axis in axes):
        raise UserError(f"volume axes {list(axes)}: give one or more of 0, 1, 2")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1")
    shape = channels.shape[1:]
    zooms = tuple(zooms) if zooms is not None else (1.0, 1.0, 1.0)
    ranges = channel_ranges(channels, options)
    single = len(axes) == 1 and not with_probabilities
    labels = np.zeros(shape, dtype=np.uint8)
    total = None if single else np.zeros((num_classes, *shape), dtype=np.float32)
    with tqdm(total=sum(shape[a] for a in axes), desc="slices", unit="slice", disable=not progress) as bar:
        for axis in axes:
            original = tuple(n for i, n in enumerate(shape) if i != axis)
            size = in_plane_size(shape, zooms, axis, options.target_spacing)
            label_view = np.moveaxis(labels, axis, 0)
            total_view = np.moveaxis(total, axis + 1, 1) if total is not None else None
            step = _slices_per_batch(batch_size, shape, axis)
            for start in range(0, shape[axis], step):
                stop = min(start + step, shape[axis])
                batch = np.stack([resample(slice_image(channels, ranges, i, axis, options), size, nearest=False)
                                  for i in range(start, stop)])  # fmt: skip
                probabilities = np.asarray(predict_slices(batch))
                if probabilities.shape != (stop - start, num_classes, *size):
                    raise ValueError(f"predict_slices returned {probabilities.shape}, expected "
                                     f"{(stop - start, num_classes, *size)}")  # fmt: skip
                probabilities = _back_to(probabilities, original)
                if total_view is None:
                    label_view[start:stop] = probabilities.argmax(axis=1)
                else:
                    total_view[:, start:stop] += probabilities.transpose(1, 0, 2, 3)
                bar.update(stop - start)
    if total is None:
        return labels, None
    total /= len(axes)
    for start in range(0, shape[2], ARGMAX_CHUNK):  # argmax makes int64: chunks keep it one slab's size
        labels[..., start : start + ARGMAX_CHUNK] = total[..., start : start + ARGMAX_CHUNK].argmax(axis=0)
    return labels, total if with_probabilities else None
