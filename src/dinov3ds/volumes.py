"""3D volumes, model-agnostic: slice-batch prediction, NIfTI output, Dice/IoU and a synthetic head phantom.

`predict_volume` knows nothing about models: it hands uint8 slice batches to a `predict_slices` callable
(the segmenter's, in `dinov3ds.inference`). Slices are quantised and preprocessed exactly as
`prepare_volumes` + `load_mri_slice` do for training, so the model sees bit-identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from dinov3ds.data.medical import (
    NIFTI_SUFFIXES,
    SlicePreprocessing,
    iter_nifti,
    preprocess_slice,
    to_uint16,
    uint16_range,
)
from dinov3ds.errors import UserError

SlicePredictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def iter_volume_files(path: Path) -> list[Path]:
    """One .nii/.nii.gz file, or every such file directly inside a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise UserError(f"{path}: not a .nii or .nii.gz file; pass a NIfTI volume or a folder of them")
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder; check the path")
    files = iter_nifti(path)
    if not files:
        raise UserError(f"{path}: no .nii/.nii.gz volumes in this folder; point at the folder holding them")
    return files


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


def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: np.dtype | type) -> None:
    """Write `array` as NIfTI on the reference's grid (affine, header), stored exactly in `dtype`.

    Scaling is reset (slope 1, intercept 0) so label ids come back as written, and the display window
    (cal_min/cal_max) of the scan is dropped because it does not fit labels or probabilities.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise UserError(f"{path}: output must end in .nii or .nii.gz")
    if array.shape != tuple(reference.shape[:3]):
        raise ValueError(f"array shape {array.shape} does not match the reference volume {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    klass = type(reference) if isinstance(reference, nib.Nifti1Image) else nib.Nifti1Image
    image = klass(np.asarray(array, dtype=dtype), reference.affine, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def dice_and_iou(prediction: np.ndarray, label: np.ndarray, foreground: int = 1) -> dict[str, float]:
    """Dice and IoU of one foreground id. Both masks empty counts as a perfect 1.0 (nothing to find, none found)."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction shape {prediction.shape} != label shape {label.shape}")
    predicted, actual = prediction == foreground, label == foreground
    intersection = int(np.count_nonzero(predicted & actual))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(actual))
    if total == 0:
        return {"dice": 1.0, "iou": 1.0}
    return {"dice": 2 * intersection / total, "iou": intersection / (total - intersection)}


def make_head_phantom(
    shape: tuple[int, int, int] = (40, 48, 32),
    *,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A synthetic T1-like head and its mask (1 = head, 0 = background), for tests, the demo and benchmarks.

    Layers of an ellipsoid in millimetres (scalp, skull, CSF, brain) with ventricles and deep nuclei of
    other intensities, a smooth multiplicative bias field and Rician noise; size and position jitter with
    `seed`. The head never reaches the first or last slice along any axis, so those slices are empty.
    """
    rng = np.random.default_rng(seed)
    extent = (np.asarray(shape) - 1) * np.asarray(spacing, dtype=np.float64)
    centre = extent * (0.5 + rng.uniform(-0.04, 0.04, 3))
    radii = extent * 0.36 * rng.uniform(0.92, 1.0, 3)
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    offsets = [(g - c) / r for g, c, r in zip(grids, centre, radii, strict=True)]
    radius = np.sqrt(sum(o**2 for o in offsets))

    def blob(centre_fraction: tuple[float, float, float], size: float) -> np.ndarray:
        # An inner ellipsoid in units of the head's radii, so it scales with the head.
        return sum(((o - c) / size) ** 2 for o, c in zip(offsets, centre_fraction, strict=True)) <= 1

    signal = np.zeros(shape, dtype=np.float64)
    signal[radius <= 1.0] = 0.9  # scalp fat: bright on T1
    signal[radius <= 0.92] = 0.15  # skull: dark
    signal[radius <= 0.86] = 0.3  # CSF
    signal[radius <= 0.8] = 0.65  # brain
    signal[blob((0.15, 0.0, 0.05), 0.18) | blob((-0.15, 0.0, 0.05), 0.18)] = 0.25  # ventricles
    signal[blob((0.3, -0.2, -0.15), 0.12) | blob((-0.3, -0.2, -0.15), 0.12)] = 0.8  # deep grey nuclei
    gradient = rng.uniform(-0.25, 0.25, 3)
    bias = np.exp(
        sum(g * (o / 2) for g, o in zip(gradient, offsets, strict=True)) + 0.1 * offsets[0] * offsets[1]
    )
    sigma = 0.03
    real = signal * bias + rng.normal(0, sigma, shape)
    imaginary = rng.normal(0, sigma, shape)
    intensity = (1000 * np.sqrt(real**2 + imaginary**2)).astype(np.float32)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -extent / 2 + np.array([3.7, -12.2, 20.5])
    image = nib.Nifti1Image(intensity, affine)
    label = nib.Nifti1Image((radius <= 1.0).astype(np.uint8), affine)
    for item in (image, label):
        item.header.set_xyzt_units("mm")
    return image, label
