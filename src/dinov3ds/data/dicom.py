"""A DICOM series folder as a NIfTI image: slices sorted by position, Hounsfield units, RAS geometry.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient vectors), never by file name or InstanceNumber, which exporters
number in either direction. A folder holding two series, slices of different orientations, or a gap or
duplicate in the positions is refused with one line: a volume with a missing slice would have the wrong
geometry everywhere past it.

Reading uses pydicom (the `medical` extra: `pip install 'dinov3ds[medical]'`).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dinov3ds.errors import UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient axes (left, posterior) → NIfTI (right, anterior)
TOLERANCE = 1e-3  # relative: orientation cosines and slice gaps agreeing this closely are equal


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The files of `folder` (not below it) that are DICOM files, by their magic bytes, not their names."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and _has_dicom_magic(p))


def is_dicom_series(path: Path) -> bool:
    return Path(path).is_dir() and bool(dicom_files(path))


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("reading DICOM needs pydicom: pip install 'dinov3ds[medical]'") from None
    return pydicom


def load_dicom_series(folder: Path) -> nib.Nifti1Image:
    """The series in `folder` as a NIfTI image: data [columns, rows, slices] in the stored units after the
    rescale (HU for CT), and an affine mapping those indices to RAS millimetres."""
    folder = Path(folder)
    pydicom = _pydicom()
    files = dicom_files(folder)
    if not files:
        raise UserError(f"{folder}: no DICOM files in it; point at the folder of one series")
    try:
        slices = [pydicom.dcmread(path) for path in files]
    except Exception as error:  # pydicom raises many types for damaged files
        raise UserError(f"{folder}: a DICOM file cannot be read ({error}); export the series again") from None
    series = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series; put each series in its own folder")
    try:
        orientations = np.array([[float(v) for v in s.ImageOrientationPatient] for s in slices])
        positions = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices])
        pixel_spacing = [float(v) for v in slices[0].PixelSpacing]
    except AttributeError as error:
        raise UserError(f"{folder}: a slice lacks its geometry ({error}); this reader needs cross-sectional images") from None
    if np.abs(orientations - orientations[0]).max() > TOLERANCE:
        raise UserError(f"{folder}: slices have different orientations (mixed series or localisers); keep one orientation")
    row_direction, column_direction = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_direction, column_direction)
    depth = positions @ normal
    order = np.argsort(depth)
    gaps = np.diff(depth[order])
    if len(slices) > 1:
        step = float(np.median(gaps))
        if step <= 0 or np.abs(gaps - step).max() > TOLERANCE * max(step, 1.0):
            raise UserError(
                f"{folder}: slice positions are not evenly spaced (gaps {np.round(gaps, 3).tolist()[:6]} mm): "
                "a slice is missing or duplicated; export the complete series"
            )
    else:
        step = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    volume = np.stack([_stored_values(slices[i]) for i in order], axis=-1)  # [rows, columns, slices]
    affine = np.eye(4)
    affine[:3, 0] = row_direction * pixel_spacing[1]  # data axis 0: along a row (column index)
    affine[:3, 1] = column_direction * pixel_spacing[0]  # data axis 1: down a column (row index)
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[order[0]]
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(1, 0, 2)), LPS_TO_RAS @ affine)
    image.header.set_xyzt_units("mm")
    return image


def _stored_values(dataset) -> np.ndarray:
    """Pixel data after RescaleSlope/Intercept (Hounsfield units for CT), float32."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # a compressed transfer syntax without its decoder, or damaged data
        raise UserError(f"cannot decode a DICOM slice's pixels ({error}); install its codec or export uncompressed") from None
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * slope + intercept
