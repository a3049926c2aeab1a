"""3D volume prediction in slice batches, with memory that does not grow with the volume's depth.

`predict_volume` knows nothing about models: it hands uint8 slice batches to a `predict_slices` callable
(the segmenter's, in `dinov3ds.commands.predict`). Slices are quantised and preprocessed exactly as
`prepare_volumes` + `load_mri_slice` do for training, so the model sees bit-identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from dinov3ds.config import SlicePreprocessing
from dinov3ds.data.medical import preprocess_slice
from dinov3ds.data.volumes import to_uint16, uint16_range
from dinov3ds.errors import UserError

SlicePredictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def predict_volume(
    volume: np.ndarray,
    predict_slices: SlicePredictor,
    *,
    axis: int,
    preprocessing: SlicePreprocessing,
    batch_size: int = 16,
    with_probabilities: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict a 3D volume slice by slice along `axis`.

    `predict_slices(uint8 [B, H, W, C]) -> (labels [B, H, W], foreground probabilities [B, H, W] or None)`.
    Returns labels (uint8, the volume's shape) and, if asked, foreground probabilities (float32). Memory
    holds the input, the outputs and one batch: slices are taken one at a time, never a preprocessed stack.
    """
    if volume.ndim != 3:
        raise UserError(f"expected a 3D volume, got shape {volume.shape}; pass one 3D volume per file")
    if axis not in (0, 1, 2):
        raise UserError(f"axis={axis}: must be 0, 1 or 2 (the volume axis to slice along)")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1")
    low, high = uint16_range(volume)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    probabilities = np.zeros(volume.shape, dtype=np.float32) if with_probabilities else None
    # Views with the slicing axis first: writing into them fills the outputs in place.
    label_slices = np.moveaxis(labels, axis, 0)
    probability_slices = np.moveaxis(probabilities, axis, 0) if probabilities is not None else None
    depth = volume.shape[axis]
    with tqdm(total=depth, desc="slices", unit="slice", disable=not progress) as bar:
        for start in range(0, depth, batch_size):
            stop = min(start + batch_size, depth)
            batch = np.stack(
                [
                    preprocess_slice(to_uint16(np.take(volume, i, axis=axis), low, high), preprocessing)
                    for i in range(start, stop)
                ]
            )
            batch_labels, batch_probabilities = predict_slices(batch)
            expected = (stop - start, *batch.shape[1:3])
            if np.shape(batch_labels) != expected:
                raise ValueError(
                    f"predict_slices returned labels of shape {np.shape(batch_labels)}, expected {expected}"
                )
            label_slices[start:stop] = batch_labels
            if probability_slices is not None:
                if batch_probabilities is None or np.shape(batch_probabilities) != expected:
                    raise ValueError(
                        f"predict_slices must return foreground probabilities of shape {expected}"
                    )
                probability_slices[start:stop] = batch_probabilities
            bar.update(stop - start)
    return labels, probabilities


