"""NIfTI volume I/O: names, checked reading, pairing images with labels, writing on a reference grid, uint16."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov3ds.data.volumes import (
    UINT16_MAX,
    is_nifti,
    load_volume,
    pair_volumes,
    save_like,
    to_uint16,
    uint16_range,
    volume_to_uint16,
)
from dinov3ds.errors import UserError

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def write(path: Path, data: np.ndarray, image_class=nib.Nifti1Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image_class(data, AFFINE)
    image.header["descrip"] = b"scanner X"
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


@pytest.mark.parametrize("name, expected", [("a.nii", True), ("b.nii.gz", True), ("C.NII.GZ", True),
                                            ("d.nii.gz.bak", False), ("e.gz", False), ("nii", False)])  # fmt: skip
def test_is_nifti_by_suffix_in_any_case(name, expected):
    assert is_nifti(Path(name)) is expected


def test_load_volume_keeps_the_header_and_accepts_integer_data(tmp_path):
    path = write(tmp_path / "a.nii.gz", np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image = load_volume(path)
    assert image.header["descrip"].tobytes().rstrip(b"\0") == b"scanner X"
    assert image.header.get_xyzt_units() == ("mm", "unknown")
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.arange(24).reshape(2, 3, 4))


def labelled_pair(folder: Path, stem: str, label_suffix: str = "_seg") -> None:
    write(folder / "images" / f"{stem}.nii.gz", np.zeros((2, 2, 2), np.float32))
    write(folder / "labels" / f"{stem}{label_suffix}.nii.gz", np.zeros((2, 2, 2), np.uint8))


def test_pairing_ignores_folders_and_other_files(tmp_path):
    labelled_pair(tmp_path, "a")
    (tmp_path / "images" / "notes.txt").write_text("x")
    (tmp_path / "images" / "looks_like.nii").mkdir()
    pairs = pair_volumes(tmp_path / "images", tmp_path / "labels")
    assert [(i.name, label.name) for i, label in pairs] == [("a.nii.gz", "a_seg.nii.gz")]


def test_two_matching_labels_are_named_in_the_error(tmp_path):
    labelled_pair(tmp_path, "a")
    write(tmp_path / "labels" / "a_mask.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(UserError, match=r"a\.nii\.gz: several label volumes match \(a_seg\.nii\.gz, a_mask\.nii\.gz\); keep exactly one$"):
        pair_volumes(tmp_path / "images", tmp_path / "labels")


def test_two_volumes_with_one_name_are_refused(tmp_path):
    labelled_pair(tmp_path, "a")
    write(tmp_path / "images" / "a.nii", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(UserError, match=r"another volume in .* has the name 'a'; rename one"):
        pair_volumes(tmp_path / "images", tmp_path / "labels")


def test_missing_label_lists_every_name_tried(tmp_path):
    labelled_pair(tmp_path, "a")
    write(tmp_path / "images" / "b.nii.gz", np.zeros((2, 2, 2), np.float32))
    tried = "b.nii[.gz], b_seg.nii[.gz], b_label.nii[.gz], b_mask.nii[.gz]"
    with pytest.raises(UserError, match=rf"b\.nii\.gz: no label volume in .*labels \(looked for {re.escape(tried)}\); add or rename it"):
        pair_volumes(tmp_path / "images", tmp_path / "labels")


def test_save_like_resets_scaling_and_display_window_and_keeps_grid(tmp_path):
    reference = nib.Nifti1Image(np.zeros((3, 4, 5, 1), np.float32), AFFINE)  # trailing singleton 4th axis
    reference.header["descrip"] = b"scanner X"
    reference.header.set_slope_inter(2.0, 10.0)
    reference.header["cal_min"], reference.header["cal_max"] = 5.0, 900.0
    labels = np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 4
    save_like(labels, reference, tmp_path / "deep" / "er" / "pred.nii.gz", np.uint8)
    saved = nib.load(tmp_path / "deep" / "er" / "pred.nii.gz")
    assert saved.get_data_dtype() == np.uint8 and saved.header["descrip"].tobytes().rstrip(b"\0") == b"scanner X"
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), labels)  # slope 1, intercept 0
    assert float(saved.header["cal_min"]) == 0 and float(saved.header["cal_max"]) == 0
    np.testing.assert_allclose(saved.affine, AFFINE, rtol=1e-6)  # stored as float32
    probabilities = np.linspace(0, 1, 60).reshape(3, 4, 5)
    save_like(probabilities, reference, tmp_path / "prob.nii", np.float32)
    assert nib.load(tmp_path / "prob.nii").get_data_dtype() == np.float32


def test_save_like_keeps_a_nifti2_reference_nifti2(tmp_path):
    reference = nib.Nifti2Image(np.zeros((2, 2, 2), np.float32), AFFINE)
    save_like(np.ones((2, 2, 2)), reference, tmp_path / "out.nii", np.uint8)
    assert type(nib.load(tmp_path / "out.nii")) is nib.Nifti2Image


def test_to_uint16_maps_low_and_high_to_the_ends_and_clips_outside():
    values = np.array([10.0, 12.5, 15.0, 20.0, 5.0, 30.0])
    assert to_uint16(values, 10.0, 20.0).tolist() == [0, 16384, 32768, UINT16_MAX, 0, UINT16_MAX]
    assert to_uint16(np.array([3, 4], dtype=np.int16), 3.0, 4.0).tolist() == [0, UINT16_MAX]  # no int overflow


def test_to_uint16_of_a_constant_volume_is_zeros_of_its_shape():
    result = to_uint16(np.full((2, 3), 7.0), 7.0, 7.0)
    assert result.shape == (2, 3) and result.dtype == np.uint16 and not result.any()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_end_of_the_range_is_refused(bad):
    volume = np.array([0.0, 1.0, bad])
    with pytest.raises(UserError, match=r"^volume: volume contains NaN/Inf voxels; fix the scan before use$"):
        volume_to_uint16(volume)
    with pytest.raises(UserError, match=r"^scan\.nii: volume contains NaN/Inf"):
        uint16_range(volume, source="scan.nii")
    with pytest.raises(UserError, match=r"^scan\.nii: "):
        volume_to_uint16(volume, source="scan.nii")


def test_to_uint16_is_computed_in_float64_whatever_the_volume_dtype():
    """float32 arithmetic would put some of 65,536 levels one off; every value must match the float64 map."""
    values = np.random.default_rng(0).normal(300, 120, 20_000).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    expected = np.clip(np.rint((values.astype(np.float64) - low) * (UINT16_MAX / (high - low))), 0, UINT16_MAX)
    np.testing.assert_array_equal(to_uint16(values, low, high), expected.astype(np.uint16))
    with pytest.raises(UserError, match=r"^volume: volume contains NaN/Inf voxels"):
        uint16_range(np.array([np.nan, 1.0]))
