"""DICOM series: written by the test from pydicom's own CT file, shuffled file names, read back in position
order with the geometry SimpleITK (a maintained, independent reader) gives the same series."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from dinov3ds.data.dicom import is_dicom_series, load_dicom_series
from dinov3ds.errors import UserError

pydicom = pytest.importorskip("pydicom", reason="the medical extra")
SLICES = 7
GAP = 2.5  # mm between slices


def write_series(folder: Path, *, skip: int | None = None, tilt_one: bool = False, reverse_numbers: bool = True) -> list[int]:
    """SLICES copies of CT_small.dcm moved along its normal, each with its own pixel offset (slice k adds
    100·k), under shuffled random names; InstanceNumber runs backwards so sorting by it would be wrong."""
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    names = [f"{random.Random(k).getrandbits(40):x}" for k in range(SLICES)]
    random.Random(1).shuffle(names)
    written = []
    for k in range(SLICES):
        if k == skip:
            continue
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        normal = np.cross(orientation[:3], orientation[3:])
        origin = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + normal * GAP * k]
        ds.SliceLocation = f"{float(origin @ normal) + GAP * k:.4f}"
        ds.InstanceNumber = SLICES - k if reverse_numbers else k + 1
        if tilt_one and k == 3:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
        pixels = ds.pixel_array.astype(np.int32) + 100 * k
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / names[k], enforce_file_format=True)
        written.append(k)
    return written


def test_series_is_read_in_position_order_with_simpleitks_geometry(tmp_path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    folder = tmp_path / "series"
    write_series(folder)
    assert is_dicom_series(folder) and not is_dicom_series(tmp_path)
    image = load_dicom_series(folder)
    data = np.asarray(image.dataobj)
    first = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    hu = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert data.shape == (128, 128, SLICES)
    for k in range(SLICES):  # slice k carries +100·k: the order is by position
        np.testing.assert_array_equal(data[:, :, k], (hu + 100 * k).T)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    np.testing.assert_allclose(sitk.GetArrayFromImage(reference).transpose(2, 1, 0), data)
    lps = np.eye(4)
    lps[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    lps[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(image.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
    assert image.header.get_zooms() == pytest.approx((0.661468, 0.661468, GAP), abs=1e-4)


def test_a_missing_slice_is_refused(tmp_path) -> None:
    write_series(tmp_path / "gap", skip=3)
    with pytest.raises(UserError, match="missing or duplicated"):
        load_dicom_series(tmp_path / "gap")


def test_mixed_orientations_are_refused(tmp_path) -> None:
    write_series(tmp_path / "tilted", tilt_one=True)
    with pytest.raises(UserError, match="different orientations"):
        load_dicom_series(tmp_path / "tilted")


def test_a_folder_without_dicom_files_is_named(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(UserError, match="no DICOM files"):
        load_dicom_series(tmp_path)
