"""A DICOM series folder as a NIfTI image: slices sorted by position, Hounsfield units, RAS geometry.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the cross
product of the ImageOrientationPatient vectors), never by file name or InstanceNumber, which exporters
number in either direction. A folder holding two series, slices of different orientations, or a gap or
duplicate in the positions is refused with one line: a volume with a missing slice would have the wrong
geometry everywhere past it. So is every file that cannot be one slice of it, by name: a truncated file, a
colour image (a secondary capture among CT slices), a zero or negative pixel spacing. A DICOMDIR (a disc's
index, no image) is skipped with a warning.

Reading uses pydicom (the `medical` extra: `pip install 'dinov3ds[medical]'`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov3ds.errors import DataWarning, UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient axes (left, posterior) → NIfTI (right, anterior)
TOLERANCE = 1e-3  # relative: orientation cosines and slice gaps agreeing this closely are equal
HEADER = 132  # a DICOM file's 128-byte preamble and "DICM"
DIRECTORY_CLASS = b"1.2.840.10008.1.3.10"  # Media Storage Directory: a DICOMDIR's SOP class, in its meta header
SUFFIXES = (".dcm", ".dicom", ".ima")  # names that say "DICOM" even when the bytes no longer do


def _kind(path: Path) -> str | None:
    """"slice", "directory" (a DICOMDIR), "truncated" (named or begun like DICOM, shorter than its header) or
    None (not DICOM: a README beside the slices)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
    except OSError:
        return None
    if head[128:HEADER] == b"DICM":
        return "directory" if DIRECTORY_CLASS in head or path.name.upper() == "DICOMDIR" else "slice"
    started = bool(head) and len(head) < HEADER and not head.strip(b"\0")  # a preamble cut short
    return "truncated" if started or path.suffix.lower() in SUFFIXES else None


def _kinds(folder: Path) -> dict[Path, str]:
    """The files of `folder` (not below it) that are DICOM or meant to be, by their bytes and names."""
    found = {p: _kind(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}
    return {path: kind for path, kind in found.items() if kind is not None}


def dicom_files(folder: Path) -> list[Path]:
    """The files of `folder` (not below it) that are DICOM slices, by their magic bytes, not their names."""
    return [path for path, kind in _kinds(folder).items() if kind == "slice"]


def is_dicom_series(path: Path) -> bool:
    """A folder with DICOM slices, or files meant to be (a truncated one is then named, never passed over)."""
    return Path(path).is_dir() and any(kind != "directory" for kind in _kinds(path).values())


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError("reading DICOM needs pydicom: pip install 'dinov3ds[medical]'") from None
    return pydicom


def _series_files(folder: Path) -> list[Path]:
    """The slice files, after refusing a truncated one and skipping (with a warning) a DICOMDIR."""
    kinds = _kinds(folder)
    for path, kind in kinds.items():
        if kind == "truncated":
            raise UserError(
                f"{path} is truncated or not a DICOM file ({path.stat().st_size} bytes, no 'DICM' marker at byte 128): "
                "copy or export it again, or move it out of the series folder"
            )
        if kind == "directory":
            warnings.warn(f"{path} is a DICOMDIR (a disc's index, no image): skipped", DataWarning, stacklevel=3)
    files = [path for path, kind in kinds.items() if kind == "slice"]
    if not files:
        raise UserError(f"{folder}: no DICOM files in it; point at the folder of one series")
    return files


def _read_slice(pydicom, path: Path):
    """One file's dataset, refused by name when it cannot be a slice of a grey-value volume."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many types for damaged files
        raise UserError(f"{path}: cannot be read as DICOM ({error}); it is damaged or truncated: export it again") \
            from None  # fmt: skip
    if "PixelData" not in dataset:
        raise UserError(f"{path} holds no pixel data: truncated, or not an image (a report or structure set); "
                        "copy it again or move it out of the series folder")  # fmt: skip
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise UserError(f"{path} is a colour image ({photometric}, {samples} samples per pixel), not a grey-value "
                        "slice (a secondary capture or screenshot?); move it out of the series folder")  # fmt: skip
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
        raise UserError(f"{path} holds {dataset.NumberOfFrames} frames; this reader takes one slice per file "
                        "(export the series as single-frame files)")  # fmt: skip
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_compressed:
        sizes = [int(dataset.get(key, 0) or 0) for key in ("Rows", "Columns", "BitsAllocated")]
        expected = (sizes[0] * sizes[1] * sizes[2] + 7) // 8
        if len(dataset.PixelData) < expected:
            raise UserError(f"{path} is truncated: its pixel data holds {len(dataset.PixelData)} of {expected} bytes; "
                            "copy or export it again")  # fmt: skip
    return dataset


def _geometry(slices: list, files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Orientations and positions of every slice, and the (row, column) spacing they share, in mm."""
    orientations, positions, spacings = [], [], []
    for path, dataset in zip(files, slices, strict=True):
        try:
            orientations.append([float(v) for v in dataset.ImageOrientationPatient])
            positions.append([float(v) for v in dataset.ImagePositionPatient])
            spacing = [float(v) for v in dataset.PixelSpacing]
        except AttributeError as error:
            raise UserError(f"{path} lacks its geometry ({error}); this reader needs cross-sectional images") from None
        if len(spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in spacing):
            raise UserError(f"{path}: PixelSpacing {spacing} mm is not two positive sizes; fix the header or export "
                            "the series again")  # fmt: skip
        if spacings and not np.allclose(spacing, spacings[0], rtol=TOLERANCE):
            raise UserError(f"{path}: PixelSpacing {spacing} mm, but {files[0]} has {spacings[0]}; keep one series "
                            "per folder")  # fmt: skip
        spacings.append(spacing)
    return np.array(orientations), np.array(positions), spacings[0]


def load_dicom_series(folder: Path) -> nib.Nifti1Image:
    """The series in `folder` as a NIfTI image: data [columns, rows, slices] in the stored units after the
    rescale (HU for CT), and an affine mapping those indices to RAS millimetres."""
    folder = Path(folder)
    pydicom = _pydicom()
    files = _series_files(folder)
    slices = [_read_slice(pydicom, path) for path in files]
    series = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series; put each series in its own folder")
    orientations, positions, pixel_spacing = _geometry(slices, files)
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
    planes = [_stored_values(slices[i], files[i]) for i in order]
    shapes = {plane.shape for plane in planes}
    if len(shapes) > 1:
        raise UserError(f"{folder}: slices of different sizes {sorted(shapes)}; keep one series per folder")
    volume = np.stack(planes, axis=-1)  # [rows, columns, slices]
    affine = np.eye(4)
    affine[:3, 0] = row_direction * pixel_spacing[1]  # data axis 0: along a row (column index)
    affine[:3, 1] = column_direction * pixel_spacing[0]  # data axis 1: down a column (row index)
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[order[0]]
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(1, 0, 2)), LPS_TO_RAS @ affine)
    image.header.set_xyzt_units("mm")
    return image


def _stored_values(dataset, path: Path) -> np.ndarray:
    """Pixel data after RescaleSlope/Intercept (Hounsfield units for CT), float32."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # a compressed transfer syntax without its decoder, or damaged data
        raise UserError(f"{path}: cannot decode its pixels ({error}); a truncated file (copy it again) or a "
                        "compressed one without its codec (install it, or export uncompressed)") from None  # fmt: skip
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * slope + intercept
