"""Medical slices and volumes: preprocessing, NIfTI → slice folders, volume inference, NIfTI output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data.medical import load_mri_slice, prepare_volumes, preprocess_slice
from dinov3ds.data.synthetic import make_head_phantom
from dinov3ds.data.volumes import load_volume, save_like, volume_to_uint16
from dinov3ds.errors import UserError
from dinov3ds.metrics import dice_and_iou
from dinov3ds.models.volume_inference import predict_volume

SHAPE = (24, 32, 20)


def write_phantoms(root: Path, count: int, label_suffix: str = "_seg") -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for seed in range(count):
        image, label = make_head_phantom(SHAPE, seed=seed)
        nib.save(image, images / f"case{seed}.nii.gz")
        nib.save(label, labels / f"case{seed}{label_suffix}.nii.gz")
    return images, labels


# --- preprocess_slice -------------------------------------------------------------------------------


def test_preprocess_slice_matches_hand_computation() -> None:
    x = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 20.0]])
    z = (x - 5.0) / np.sqrt(np.mean((x - 5.0) ** 2))  # mean 5
    clipped = np.clip(z, -1.0, 1.0)  # only 20 clips (z ≈ 2.08); the rest lie in [-0.74, -0.14]
    expected = np.rint(255 * ((clipped + 1) / 2) ** 0.5).astype(np.uint8)
    out = preprocess_slice(x, SlicePreprocessing(clip=1.0, gamma=0.5, channels=2))
    assert out.shape == (2, 3, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    assert out[1, 2, 0] == 255


def test_preprocess_slice_without_zscore_or_gamma_is_min_max() -> None:
    x = np.array([[10, 20], [30, 110]], dtype=np.uint16)
    out = preprocess_slice(x, SlicePreprocessing(zscore=False, clip=None, gamma=None, channels=1))
    np.testing.assert_array_equal(out[..., 0], [[0, 26], [51, 255]])  # 25.5 and 51 rounded half-to-even


def test_default_gamma_lifts_low_intensities() -> None:
    x = np.linspace(0, 1, 12).reshape(3, 4)
    linear = preprocess_slice(x, SlicePreprocessing(gamma=None))
    lifted = preprocess_slice(x, SlicePreprocessing())
    assert (lifted.astype(int) >= linear.astype(int)).all() and (lifted > linear).any()


def test_constant_slice_gives_zeros_not_nan() -> None:
    constant = np.full((4, 5), 7.0)
    no_clip = preprocess_slice(constant, SlicePreprocessing(clip=None, gamma=None))
    assert not no_clip.any()
    # With clipping, z = 0 sits mid-range: 255 * 0.5 ** 0.75 = 151.6.
    assert (preprocess_slice(constant, SlicePreprocessing()) == 152).all()


def test_nan_slice_names_the_file() -> None:
    x = np.ones((3, 3))
    x[1, 1] = np.nan
    with pytest.raises(UserError, match=r"scan_07\.png.*1 NaN/Inf"):
        preprocess_slice(x, SlicePreprocessing(), source="scan_07.png")


def test_options_reject_typos_and_clip_without_zscore() -> None:
    with pytest.raises(ValidationError):
        SlicePreprocessing(gama=0.5)
    with pytest.raises(ValidationError, match="zscore"):
        SlicePreprocessing(zscore=False)


# --- prepare_volumes --------------------------------------------------------------------------------


def test_prepare_volumes_layout_split_and_bit_depth(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 5)
    out = tmp_path / "prepared"
    summary = prepare_volumes(images, labels, out, axis=1, val_fraction=0.2, test_fraction=0.2, seed=3)

    splits = summary["splits"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert sorted(sum(splits.values(), [])) == [f"case{i}" for i in range(5)]
    assert json.loads((out / "volumes.json").read_text()) == summary
    for split, names in splits.items():
        volume_dirs = {p.name for p in (out / "images" / split).iterdir()} if names else set()
        assert volume_dirs == set(names)  # every slice of a volume lives in that volume's split only
        for name in names:
            pngs = sorted((out / "images" / split / name).glob("*.png"))
            assert [p.name for p in pngs] == [f"{name}_{i:04d}.png" for i in range(SHAPE[1])]
            masks = sorted((out / "annotations" / split / name).glob("*.png"))
            assert [p.name for p in masks] == [p.name for p in pngs]

    name = splits["train"][0]
    with Image.open(out / "images" / "train" / name / f"{name}_0016.png") as png:
        assert png.mode == "I;16"
        stored = np.asarray(png)
    volume = np.asanyarray(nib.load(images / f"{name}.nii.gz").dataobj)
    np.testing.assert_array_equal(stored, volume_to_uint16(volume)[:, 16, :])
    assert stored.max() == 65535 or volume_to_uint16(volume).max() == 65535
    with Image.open(out / "annotations" / "train" / name / f"{name}_0016.png") as mask:
        assert mask.mode == "L"
        label = np.asanyarray(nib.load(labels / f"{name}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asarray(mask), label[:, 16, :])


def test_split_is_seeded_and_keeps_train(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 5)
    first = prepare_volumes(images, labels, tmp_path / "a", seed=1)["splits"]
    again = prepare_volumes(images, labels, tmp_path / "b", seed=1)["splits"]
    assert first == again
    with pytest.raises(UserError, match="at least one must stay in train"):
        prepare_volumes(images, labels, tmp_path / "c", val_fraction=0.6, test_fraction=0.3)


def test_skip_empty_drops_background_only_slices(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 1, label_suffix="")
    summary = prepare_volumes(images, labels, tmp_path / "out", val_fraction=0.0, skip_empty=True)
    record = summary["volumes"][0]
    label = np.asanyarray(nib.load(labels / "case0.nii.gz").dataobj)
    non_empty = [i for i in range(SHAPE[2]) if label[:, :, i].any()]
    assert 0 < record["written"] == len(non_empty) < record["slices"] == SHAPE[2]
    written = sorted(p.name for p in (tmp_path / "out" / "annotations" / "train" / "case0").glob("*.png"))
    assert written == [f"case0_{i:04d}.png" for i in non_empty]


def test_label_map_and_shared_folder(tmp_path: Path) -> None:
    # Images and labels in one folder (BraTS style): `_mask` files are labels, not images.
    folder = tmp_path / "data"
    folder.mkdir()
    image, label = make_head_phantom(SHAPE, seed=0)
    nib.save(image, folder / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj) * 4, label.affine), folder / "a_mask.nii.gz")
    summary = prepare_volumes(folder, folder, tmp_path / "out", val_fraction=0.0, label_map={4: 1})
    assert [r["name"] for r in summary["volumes"]] == ["a"]
    with Image.open(tmp_path / "out" / "annotations" / "train" / "a" / "a_0010.png") as mask:
        assert set(np.unique(np.asarray(mask))) == {0, 1}


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 2)
    nib.save(nib.Nifti1Image(np.zeros((24, 32, 19), np.uint8), np.eye(4)), labels / "case1_seg.nii.gz")
    with pytest.raises(
        UserError, match=r"case1\.nii\.gz.*\(24, 32, 20\).*case1_seg\.nii\.gz.*\(24, 32, 19\)"
    ):
        prepare_volumes(images, labels, tmp_path / "out")


def test_missing_label_is_reported(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 2)
    (labels / "case1_seg.nii.gz").unlink()
    with pytest.raises(UserError, match=r"case1\.nii\.gz: no label volume"):
        prepare_volumes(images, labels, tmp_path / "out")


# --- load_volume errors -----------------------------------------------------------------------------


def test_load_volume_rejects_bad_files(tmp_path: Path) -> None:
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), affine), tmp_path / "series.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), affine), tmp_path / "flat.nii")
    nan = np.zeros((4, 5, 6), np.float32)
    nan[0, 0, :3] = np.nan
    nan[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(nan, affine), tmp_path / "nan.nii.gz")
    (tmp_path / "fake.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    (tmp_path / "text.nii").write_text("hello")

    with pytest.raises(UserError, match=r"series\.nii\.gz: expected a 3D volume, got shape \(4, 5, 6, 2\)"):
        load_volume(tmp_path / "series.nii.gz")
    with pytest.raises(UserError, match=r"flat\.nii: expected a 3D volume"):
        load_volume(tmp_path / "flat.nii")
    with pytest.raises(UserError, match=r"nan\.nii\.gz: contains 4 NaN/Inf voxels"):
        load_volume(tmp_path / "nan.nii.gz")
    for name in ("fake.nii.gz", "text.nii"):
        with pytest.raises(UserError, match=rf"{name}: not a readable NIfTI"):
            load_volume(tmp_path / name)
    with pytest.raises(UserError, match="file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_load_volume_squeezes_trailing_singleton(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "v.nii.gz")
    volume = load_volume(tmp_path / "v.nii.gz")
    assert volume.shape == (4, 5, 6)
    np.testing.assert_array_equal(np.asanyarray(volume.dataobj), data[..., 0])
    np.testing.assert_array_equal(volume.affine, np.diag([2.0, 2.0, 3.0, 1.0]))


def test_prepare_volumes_reports_nan_volume(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 2)
    image = nib.load(images / "case0.nii.gz")
    data = image.get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), images / "case0.nii.gz")
    with pytest.raises(UserError, match=r"case0\.nii\.gz: contains 1 NaN/Inf"):
        prepare_volumes(images, labels, tmp_path / "out")


# --- training and inference see the same arrays ---------------------------------------------------------


def test_training_slices_equal_inference_slices(tmp_path: Path) -> None:
    images, labels = write_phantoms(tmp_path, 1)
    out = tmp_path / "out"
    prepare_volumes(images, labels, out, axis=0, val_fraction=0.0)
    options = SlicePreprocessing()
    volume = np.asanyarray(load_volume(images / "case0.nii.gz").dataobj)
    seen: list[np.ndarray] = []

    def capture(batch: np.ndarray) -> np.ndarray:
        seen.extend(batch)
        return np.zeros((len(batch), 2, *batch.shape[1:3]), np.float32)

    predict_volume(volume, capture, axes=[0], options=options, num_classes=2, batch_size=5, progress=False)
    assert len(seen) == SHAPE[0]
    for index in (0, 7, 12, 23):
        trained = load_mri_slice(out / "images" / "train" / "case0" / f"case0_{index:04d}.png", options)
        assert trained.dtype == np.uint8 and trained.shape == (*SHAPE[1:], 3)
        np.testing.assert_array_equal(trained, seen[index])
        np.testing.assert_array_equal(trained, preprocess_slice(volume_to_uint16(volume)[index], options))


def test_load_mri_slice_reads_8bit_and_reports_broken_files(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "slice.png")
    options = SlicePreprocessing()
    np.testing.assert_array_equal(
        load_mri_slice(tmp_path / "slice.png", options), preprocess_slice(gray, options)
    )
    (tmp_path / "broken.png").write_bytes(b"no png")
    with pytest.raises(UserError, match=r"broken\.png: cannot read"):
        load_mri_slice(tmp_path / "broken.png", options)


# --- predict_volume -----------------------------------------------------------------------------------


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """[B, H, W] class ids → [B, K, H, W] probabilities (1 on the class)."""
    return (labels[:, None] == np.arange(classes)[None, :, None, None]).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_volume_puts_each_slice_back_in_place(axis: int) -> None:
    volume = np.asanyarray(make_head_phantom(SHAPE, seed=2)[0].dataobj)
    # Encode the slice's position in the batch stream: slice k gets class k + 1 everywhere.
    counter = iter(range(1, 1000))

    def index_labels(batch: np.ndarray) -> np.ndarray:
        ids = np.array([next(counter) for _ in range(len(batch))])
        return one_hot(np.broadcast_to(ids[:, None, None], batch.shape[:3]), 60)

    labels, probabilities = predict_volume(volume, index_labels, axes=[axis], options=SlicePreprocessing(),
                                           num_classes=60, batch_size=7, with_probabilities=True)  # fmt: skip
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert probabilities.shape == (60, *volume.shape) and probabilities.dtype == np.float32
    for index in range(volume.shape[axis]):
        assert (np.take(labels, index, axis=axis) == index + 1).all()
    expected = (labels[None] == np.arange(60)[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(probabilities, expected)


def test_several_axes_average_their_probabilities() -> None:
    """Axis 0 says class 1 everywhere with p 0.6, axis 2 class 2 with p 0.9: the mean picks class 2."""
    volume = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    calls = {"n": 0}

    def predictor(batch: np.ndarray) -> np.ndarray:
        calls["n"] += len(batch)
        first = batch.shape[1:3] == (5, 4)  # slices along axis 0 are 5 x 4
        out = np.full((len(batch), 3, *batch.shape[1:3]), 0.05, np.float32)
        out[:, 1 if first else 2] = 0.6 if first else 0.9
        return out

    labels, probabilities = predict_volume(volume, predictor, axes=[0, 2], options=SlicePreprocessing(), num_classes=3,
                                           with_probabilities=True, progress=False)  # fmt: skip
    assert calls["n"] == 6 + 4
    assert (labels == 2).all()
    np.testing.assert_allclose(probabilities[2], (0.05 + 0.9) / 2, rtol=1e-6)


def test_threshold_predictor_segments_the_phantom() -> None:
    image, label = make_head_phantom(SHAPE, seed=4)

    def threshold(batch: np.ndarray) -> np.ndarray:
        # Scalp and brain sit above mid-grey after z-score/clip/gamma; the dark skull does not, so a
        # threshold finds much of the head but not all of it: the phantom needs a learned segmenter.
        return one_hot((batch[..., 0] > 160).astype(np.int64), 2)

    labels, probabilities = predict_volume(np.asanyarray(image.dataobj), threshold, options=SlicePreprocessing(),
                                           num_classes=2, progress=False)  # fmt: skip
    assert probabilities is None
    assert 0.5 < dice_and_iou(labels, np.asanyarray(label.dataobj))["dice"] < 0.9


def test_predict_volume_rejects_wrong_predictor_output() -> None:
    volume = np.random.default_rng(0).random((4, 5, 6))
    with pytest.raises(ValueError, match="predict_slices returned"):
        predict_volume(volume, lambda b: np.zeros((1, 2, 2, 2)), options=SlicePreprocessing(), num_classes=2,
                       progress=False)  # fmt: skip
    with pytest.raises(UserError, match="volume axes"):
        predict_volume(volume, lambda b: b, axes=[3], options=SlicePreprocessing(), num_classes=2)


# --- save_like, metrics, file discovery ------------------------------------------------------------------


def test_save_like_keeps_grid_and_values(tmp_path: Path) -> None:
    image, label = make_head_phantom(SHAPE, seed=5)
    nib.save(image, tmp_path / "scan.nii.gz")
    reference = load_volume(tmp_path / "scan.nii.gz")
    mask = np.asanyarray(label.dataobj).copy()
    mask[0, 0, 0] = 3
    save_like(mask, reference, tmp_path / "out" / "mask.nii.gz", np.uint8)
    probabilities = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    save_like(probabilities, reference, tmp_path / "prob.nii", np.float32)

    reloaded = nib.load(tmp_path / "out" / "mask.nii.gz")
    assert reloaded.shape == SHAPE and reloaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(reloaded.affine, reference.affine)
    np.testing.assert_array_equal(np.asanyarray(reloaded.dataobj), mask)
    assert reloaded.header.get_zooms() == reference.header.get_zooms()
    reloaded = nib.load(tmp_path / "prob.nii")
    np.testing.assert_array_equal(np.asanyarray(reloaded.dataobj), probabilities)
    with pytest.raises(UserError, match=r"mask\.png: output must end in \.nii"):
        save_like(mask, reference, tmp_path / "mask.png", np.uint8)


def test_phantom_is_seeded_with_anisotropic_affine() -> None:
    image, label = make_head_phantom(SHAPE, seed=1, spacing=(1.0, 1.0, 2.5))
    again, _ = make_head_phantom(SHAPE, seed=1, spacing=(1.0, 1.0, 2.5))
    other, other_label = make_head_phantom(SHAPE, seed=2, spacing=(1.0, 1.0, 2.5))
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(again.dataobj))
    assert not np.array_equal(np.asanyarray(label.dataobj), np.asanyarray(other_label.dataobj))
    np.testing.assert_allclose(np.diag(image.affine)[:3], [1.0, 1.0, 2.5])
    assert np.abs(image.affine[:3, 3]).min() > 0
    mask = np.asanyarray(label.dataobj)
    assert set(np.unique(mask)) == {0, 1} and image.shape == label.shape == SHAPE
    assert np.asanyarray(image.dataobj)[mask == 1].mean() > 3 * np.asanyarray(image.dataobj)[mask == 0].mean()
