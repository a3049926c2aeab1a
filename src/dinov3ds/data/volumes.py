"""NIfTI volumes on disk: reading them checked (declared size, voxel grids, integer labels), writing on a
reference grid, pairing images with labels.

Also the uint16 quantisation that `prepare_volumes` stores slices in and volume inference reproduces, so
the two paths hand the same integers to `preprocess_slice`.
"""

from __future__ import annotations

import os
import zlib
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


def read_header(path: Path) -> nib.Nifti1Image:
    """The NIfTI image at `path` with its data not yet read, its declared size checked against the limits."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        image = nib.load(path)  # the header only: the data is read once its size is known to be sane
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise UserError(
            f"{path}: not a readable NIfTI file ({error}); convert it to .nii/.nii.gz (e.g. with dcm2niix)"
        ) from error
    _check_declared_size(path, image)
    return image


def load_volume(path: Path, *, expect_3d: bool = True) -> nib.Nifti1Image:
    """Load a NIfTI image with its data in memory, checked: 3D (a trailing 4th dim of 1 is squeezed), finite.

    The data is read once here (the NaN check needs it) and kept, so callers do not read the file twice.
    """
    path = Path(path)
    image = read_header(path)
    try:
        data = np.asanyarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise UserError(
            f"{path}: not a readable NIfTI file ({error}); convert it to .nii/.nii.gz (e.g. with dcm2niix)"
        ) from error
    except MemoryError:
        raise UserError(
            f"{path}: not enough memory to read its {decoded_bytes(image):,} bytes; free memory or crop the scan"
        ) from None
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


def _limit(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a whole number; set it to an integer or unset it") from None


def max_voxels() -> int:
    """The largest volume read (voxels): DINOV3DS_MAX_VOXELS, default 2**31 (a 1024 x 1024 x 2048 scan)."""
    return _limit("DINOV3DS_MAX_VOXELS", 2**31)


def max_volume_bytes() -> int:
    """The most memory one volume may decode to: DINOV3DS_MAX_VOLUME_BYTES, default 8 GiB (a 1024 x 1024 x 2048
    int16 CT takes 4 GiB). A gzip bomb declares a huge float64 volume in a few KB: refused before decompressing."""
    return _limit("DINOV3DS_MAX_VOLUME_BYTES", 8 * 2**30)


def decoded_bytes(image: nib.Nifti1Image) -> int:
    """Bytes of the array the header declares, as nibabel decodes it (float64 when the header scales values)."""
    voxels = int(np.prod(image.shape, dtype=np.float64))
    slope, intercept = image.header.get_slope_inter()
    scaled = slope is not None and (slope != 1 or (intercept or 0) != 0)
    return voxels * max(image.get_data_dtype().itemsize, 8 if scaled else 0)


def _check_declared_size(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a header that claims more data than the file can hold (uncompressed) or than the voxel and byte
    limits allow (compressed): a 2 KB file claiming 30000³ voxels must not allocate 100 GB."""
    voxels = int(np.prod(image.shape, dtype=np.float64))
    shape = " x ".join(map(str, image.shape))
    if voxels > max_voxels():
        raise UserError(
            f"{path}: its header declares {shape} = {voxels:,} voxels, over the "
            f"limit of {max_voxels():,}; check the file, or raise DINOV3DS_MAX_VOXELS if it is real"
        )
    if decoded_bytes(image) > max_volume_bytes():
        raise UserError(
            f"{path}: its header declares {shape} {image.get_data_dtype()} voxels = {decoded_bytes(image):,} bytes "
            f"decoded, over the limit of {max_volume_bytes():,}; check the file (a gzip bomb?), or raise "
            "DINOV3DS_MAX_VOLUME_BYTES if it is real"
        )
    if not path.name.lower().endswith(".gz"):
        needed = int(image.header.get("vox_offset", 0)) + voxels * image.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise UserError(
                f"{path}: its header declares {shape} voxels ({needed:,} bytes) but "
                f"the file has {size:,} bytes; it is truncated or corrupt: export it again"
            )


GRID_TOLERANCE = 1e-4  # mm (spacing, origin) and direction cosines, plus 1e-5 of the value: np.allclose as nnU-Net


def grid_difference(image: nib.Nifti1Image, reference: nib.Nifti1Image) -> str | None:
    """What differs between two voxel grids, as nnU-Net's dataset integrity check compares them (shape, spacing,
    origin, direction), or None when they are one grid."""
    if tuple(image.shape[:3]) != tuple(reference.shape[:3]):
        return f"shape {tuple(image.shape[:3])} vs {tuple(reference.shape[:3])}"
    parts = {}
    for name, grid in (("image", image), ("reference", reference)):
        linear = np.asarray(grid.affine, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        parts[name] = {"spacing": spacing, "origin": np.asarray(grid.affine, dtype=np.float64)[:3, 3],
                       "direction": linear / np.where(spacing > 0, spacing, 1)}  # fmt: skip
    for key in ("spacing", "origin", "direction"):
        a, b = parts["image"][key], parts["reference"][key]
        if not np.allclose(a, b, rtol=1e-5, atol=GRID_TOLERANCE):
            shown = (np.round(a, 4).tolist(), np.round(b, 4).tolist())
            return f"{key} {shown[0]} vs {shown[1]}"
    return None


def check_same_grid(path: Path, image: nib.Nifti1Image, reference_path: Path, reference: nib.Nifti1Image) -> None:
    """Refuse `image` unless it lies on `reference`'s voxel grid (within GRID_TOLERANCE), naming what differs."""
    difference = grid_difference(image, reference)
    if difference is None:
        return
    if difference.startswith("shape"):
        raise UserError(f"{path} has shape {tuple(image.shape[:3])} but {reference_path} has shape "
                        f"{tuple(reference.shape[:3])}; resample it onto {Path(reference_path).name}'s grid")  # fmt: skip
    raise UserError(
        f"{path} and {reference_path} have different affines: {difference} (tolerance {GRID_TOLERANCE:g} mm + 1e-5 "
        f"relative, as nnU-Net's integrity check); resample it onto {Path(reference_path).name}'s grid"
    )


def integer_labels(data: np.ndarray, source: Path | str) -> np.ndarray:
    """Stored label values as int64. A fractional value (0.5, 1.7: a label resampled with interpolation, or a
    probability map) is refused, naming the first one and its voxel, instead of being rounded to some class."""
    if np.issubdtype(data.dtype, np.floating):
        fractional = data != np.rint(data)
        if fractional.any():
            voxel = tuple(int(i) for i in np.unravel_index(int(np.argmax(fractional)), data.shape))
            raise UserError(
                f"{source}: label value {float(data[voxel]):g} at voxel {voxel} is not an integer class id; save "
                "the label with integer ids (resample labels with nearest neighbour)"
            )
    return np.asarray(data).astype(np.int64)


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
