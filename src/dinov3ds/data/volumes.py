"""NIfTI volumes on disk: reading them checked, writing on a reference grid, pairing images with labels.

Also the uint16 quantisation that `prepare_volumes` stores slices in and volume inference reproduces, so
the two paths hand the same integers to `preprocess_slice`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov3ds.errors import UserError


def is_nifti(path: Path) -> bool:
    """True for .nii and .nii.gz names (any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first: volume_stem strips the whole suffix


# A label volume matches an image volume with the same stem, optionally followed by one of these.
LABEL_SUFFIXES = ("", "_seg", "_label", "_mask")


UINT16_MAX = 65535


def volume_stem(path: Path) -> str:
    """File name without .nii / .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_volume(path: Path, *, expect_3d: bool = True) -> nib.Nifti1Image:
    """Load a NIfTI image with its data in memory, checked: 3D (a trailing 4th dim of 1 is squeezed), finite.

    The data is read once here (the NaN check needs it) and kept, so callers do not read the file twice.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        image = nib.load(path)  # the header only; the data is read below, once its size is known to be sane
        _check_declared_size(path, image)
        data = np.asanyarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise UserError(
            f"{path}: not a readable NIfTI file ({error}); convert it to .nii/.nii.gz (e.g. with dcm2niix)"
        ) from error
    if expect_3d:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise UserError(
                f"{path}: expected a 3D volume, got shape {data.shape}; "
                "pass one 3D volume per file (split 4D series into single volumes)"
            )
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise UserError(
                f"{path}: contains {bad} NaN/Inf voxels; fix the scan or replace them (e.g. with 0) before use"
            )
    return type(image)(data, image.affine, image.header)


def max_voxels() -> int:
    """The largest volume read (voxels): DINOV3DS_MAX_VOXELS, default 2**31 (a 1024 x 1024 x 2048 scan)."""
    return int(os.environ.get("DINOV3DS_MAX_VOXELS", 2**31))


def _check_declared_size(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a header that claims more data than the file can hold (uncompressed) or than the voxel limit
    allows (compressed): a 2 KB file claiming 30000³ voxels must not allocate 100 GB."""
    voxels = int(np.prod(image.shape, dtype=np.float64))
    if voxels > max_voxels():
        raise UserError(
            f"{path}: its header declares {' x '.join(map(str, image.shape))} = {voxels:,} voxels, over the "
            f"limit of {max_voxels():,}; check the file, or raise DINOV3DS_MAX_VOXELS if it is real"
        )
    if not path.name.lower().endswith(".gz"):
        needed = int(image.header.get("vox_offset", 0)) + voxels * image.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise UserError(
                f"{path}: its header declares {' x '.join(map(str, image.shape))} voxels ({needed:,} bytes) but "
                f"the file has {size:,} bytes; it is truncated or corrupt: export it again"
            )


def uint16_range(volume: np.ndarray, *, source: str = "volume") -> tuple[float, float]:
    """The (min, max) that `to_uint16` maps to 0..65535; computed without copying the volume."""
    low, high = float(np.min(volume)), float(np.max(volume))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UserError(f"{source}: volume contains NaN/Inf voxels; fix the scan before use")
    return low, high


def to_uint16(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..65535; the one formula used for slice PNGs and volume inference."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint16)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (UINT16_MAX / (high - low))
    return np.clip(np.rint(scaled), 0, UINT16_MAX).astype(np.uint16)


def volume_to_uint16(volume: np.ndarray, *, source: str = "volume") -> np.ndarray:
    """Per-volume min-max map to uint16.

    Slice PNGs are 16-bit, so this keeps 65,536 levels (more than MRI scanners resolve). The map is
    affine, and per-slice z-scoring in `preprocess_slice` cancels any affine map, so the choice of range
    does not change what the model sees beyond rounding.
    """
    return to_uint16(volume, *uint16_range(volume, source=source))


def iter_nifti(folder: Path) -> list[Path]:
    """The .nii/.nii.gz files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def pair_volumes(images_dir: Path, labels_dir: Path) -> list[tuple[Path, Path]]:
    """Match each image volume to its label volume by name (see LABEL_SUFFIXES).

    Images and labels may share one folder (BraTS style `case.nii.gz` + `case_seg.nii.gz`): a file that is
    another file's label is not itself an image.
    """
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found; pass the folder holding the .nii/.nii.gz volumes")
    images = iter_nifti(images_dir)
    if not images:
        raise UserError(f"{images_dir}: no .nii/.nii.gz volumes found; point images_dir at the scans")
    labels = {p.name: p for p in iter_nifti(labels_dir)}
    matches: dict[Path, Path] = {}
    for image in images:
        stem = volume_stem(image)
        candidates = [
            labels[stem + suffix + ext]
            for suffix in LABEL_SUFFIXES
            for ext in NIFTI_SUFFIXES
            if stem + suffix + ext in labels and labels[stem + suffix + ext] != image
        ]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise UserError(f"{image}: several label volumes match ({names}); keep exactly one")
        if candidates:
            matches[image] = candidates[0]
    used_as_labels = set(matches.values())
    images = [p for p in images if p not in used_as_labels]
    stems = [volume_stem(p) for p in images]
    for image, stem in zip(images, stems, strict=True):
        if stems.count(stem) > 1:
            raise UserError(f"{image}: another volume in {images_dir} has the name {stem!r}; rename one")
        if image not in matches:
            tried = ", ".join(stem + s + ".nii[.gz]" for s in LABEL_SUFFIXES)
            raise UserError(
                f"{image}: no label volume in {labels_dir} (looked for {tried}); add or rename it"
            )
    return [(image, matches[image]) for image in images]


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
    header.set_data_dtype(dtype)  # nibabel then writes the values unscaled (slope 1, intercept 0)
    header["cal_min"], header["cal_max"] = 0, 0
    image = type(reference)(np.asarray(array), reference.affine, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
