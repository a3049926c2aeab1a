"""Issue 37: medical data train with nnU-Net's choices, derived from a cached dataset fingerprint, unless the config
says otherwise; rare structures are sampled; the metrics of an absent class follow a named convention
(tests/test_volume_metrics.py). Data: generated brain-like volumes (`make_head_phantom`) as an nnU-Net v2 raw
dataset with a large, a middle and a rare class, on anisotropic voxels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from dinov3ds.cli import main
from dinov3ds.config import with_overrides
from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data import fingerprint as fingerprints
from dinov3ds.data.build import resolve_dataset_settings
from dinov3ds.data.medical import prepare_volumes
from dinov3ds.data.nnunet import read_nnunet
from dinov3ds.data.sampling import ForegroundOversampling, SeededSamples, class_presence
from dinov3ds.data.synthetic import make_head_phantom
from dinov3ds.data.transforms import SegmentationTrainTransform
from dinov3ds.data.volume_slices import channel_ranges, slice_image
from dinov3ds.errors import UserError
from tests.conftest import tiny

SHAPE, SPACING = (40, 16, 36), (1.0, 2.5, 1.0)  # axis 1 is the coarse one: slices lie across it
NAMES = {"background": 0, "grey": 1, "white": 2, "other": 3}


def brain_case(seed: int) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A T1-like head; its darker half is class 1, the brighter class 2, a 3-voxel cube at the centre class 3."""
    image, head = make_head_phantom(SHAPE, seed=seed, spacing=SPACING)
    data, inside = np.asarray(image.dataobj), np.asarray(head.dataobj) > 0
    labels = inside.astype(np.uint8)
    labels[inside & (data > np.median(data[inside]))] = 2
    centre = tuple(n // 2 for n in SHAPE)
    labels[centre[0] - 1 : centre[0] + 2, centre[1] - 1 : centre[1] + 2, centre[2] - 1 : centre[2] + 2] = 3
    return image, labels


def write_brain_dataset(root: Path, cases: int = 5) -> Path:
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(cases):
        image, labels = brain_case(index)
        nib.save(image, root / "imagesTr" / f"brain_{index:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, image.affine), root / "labelsTr" / f"brain_{index:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": NAMES, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    return write_brain_dataset(tmp_path_factory.mktemp("brain") / "Dataset037_Brain")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def training_cases(root: Path):
    dataset = read_nnunet(root)
    return dataset, dataset.split(0, 0.2, 0)[0]


def configured(root: Path, *overrides: str):
    config = with_overrides({}, ["task=segmentation", "data.dataset=nnunet", f"data.root={root}", *overrides])
    return config, resolve_dataset_settings(config)


def test_the_defaults_of_a_brain_dataset_are_nnunets(brain, own_cache) -> None:
    """The first row of the issue's table trained on ADE20K's defaults (photometric distortion, resize 0.5-2, per-slice
    z-score with gamma): with nothing set, each of those is now nnU-Net's, derived from the fingerprint."""
    config, lines = configured(brain)
    data, medical = config.data, config.data.medical
    assert data.photometric is False and tuple(data.scale_range) == (0.7, 1.4)
    assert (medical.rotation, medical.rotation_probability, medical.vertical_flip) == (180.0, 0.2, True)
    assert medical.foreground_share == 0.33 and config.loss.name == "ce+dice"
    assert medical.axes == [1] and config.inference.volume_axis == 1  # across the 2.5 mm axis
    assert medical.target_spacing == pytest.approx(1.0)
    assert data.image_size == 64 and data.base_size == 36  # median slice 40 x 36: 40 up to a multiple of 32
    assert (medical.zscore, medical.zscore_over, medical.gamma) == (True, "volume", None)
    fingerprint = fingerprints.nnunet_fingerprint(*training_cases(brain), own_cache)
    widest = max(abs(fingerprint.channels[0].zscored_00_5), abs(fingerprint.channels[0].zscored_99_5))
    assert widest <= medical.clip < widest + 0.5 and medical.clip * 2 == int(medical.clip * 2)
    assert set(medical.derived) >= {"data.photometric", "data.scale_range", "data.image_size", "data.medical.clip"}
    assert medical.derived["data.image_size"].value == 64 and "median slice 40 x 36" in medical.derived["data.image_size"].source
    assert lines[0] == "dataset fingerprint (4 training cases):"
    assert any(line.startswith("  class voxels: background") and "other 0." in line for line in lines)


def test_what_the_config_sets_wins_and_is_not_recorded_as_derived(brain) -> None:
    config, lines = configured(brain, "data.scale_range=[0.9, 1.1]", "data.medical={gamma: 0.5}", "inference.volume_axis=2",
                               "loss.name=ce")  # fmt: skip
    medical = config.data.medical
    assert tuple(config.data.scale_range) == (0.9, 1.1) and config.inference.volume_axis == 2 and config.loss.name == "ce"
    # gamma is part of the MRI intensity recipe: giving it keeps the whole recipe (per-slice z-score, clip 2)
    assert (medical.gamma, medical.zscore_over, medical.clip) == (0.5, "slice", 2.0)
    assert not {"data.scale_range", "inference.volume_axis", "loss.name", "data.medical.clip"} & set(medical.derived)
    assert "  data.scale_range = [0.9, 1.1]  (set in the config)" in lines
    assert config.data.photometric is False and medical.foreground_share == 0.33  # the rest is still derived
    # training slices follow the prediction axis the config names: along axis 2, slices are 40 x 16 (x 2.5 mm)
    assert medical.axes == [2] and medical.target_spacing == 1.0 and config.data.image_size == 64
    assert "  data.medical.axes = [2]  (inference.volume_axis set in the config)" in lines


def test_derivation_is_idempotent_and_a_saved_config_keeps_it_unless_edited(brain, tmp_path) -> None:
    from dinov3ds.config import load_config, save_config

    config, lines = configured(brain)
    assert resolve_dataset_settings(config) == lines  # the trainer and the dataset builder both call it
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["medical"]["derived"]
    assert saved["data.base_size"] == {"value": 36, "source": saved["data.base_size"]["source"]}
    again = load_config(tmp_path / "config.yaml")
    assert resolve_dataset_settings(again) == lines
    edited = load_config(tmp_path / "config.yaml", ["data.base_size=50"])  # an edit of a derived value wins
    resolve_dataset_settings(edited)
    assert edited.data.base_size == 50 and "data.base_size" not in edited.data.medical.derived


def test_the_fingerprint_is_cached_and_follows_the_files(brain, tmp_path, monkeypatch, own_cache) -> None:
    copy = write_brain_dataset(tmp_path / "copy", cases=3)
    dataset, cases = training_cases(copy)
    first = fingerprints.nnunet_fingerprint(dataset, cases, own_cache)
    assert len(list((own_cache / "fingerprints").glob("*.json"))) == 1
    assert first.spacings[0] == pytest.approx(SPACING) and first.shapes[0] == list(SHAPE)
    assert sum(first.class_voxels.values()) == pytest.approx(1.0) and 0 < first.class_voxels["other"] < 0.002

    def no_reading(*args):
        raise AssertionError("a cached fingerprint reads no volume")

    monkeypatch.setattr(fingerprints, "load_case", no_reading)
    assert fingerprints.nnunet_fingerprint(dataset, cases, own_cache) == first
    image, labels = brain_case(7)
    nib.save(nib.Nifti1Image(labels * 0, image.affine), cases[0].label)  # a changed label: measured again
    with pytest.raises(AssertionError, match="reads no volume"):
        fingerprints.nnunet_fingerprint(dataset, cases, own_cache)


def test_check_data_prints_the_fingerprint_and_the_derived_settings(brain, tmp_path, capsys) -> None:
    config = tmp_path / "brain.yaml"
    config.write_text(f"task: segmentation\ndata: {{dataset: nnunet, root: {brain}}}\nhead: {{name: unet}}\n")
    assert main(["check-data", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "dataset fingerprint (4 training cases):" in out and "spacing mm  median 1 x 2.5 x 1" in out
    assert "channel 0 T1 (MRI): foreground p0.5" in out and "class voxels: background" in out
    assert "data.image_size = 64  (median slice 40 x 36 px" in out and "data.medical.zscore_over = \"volume\"" in out
    assert out.rstrip().endswith("cases checked (train: 4, val: 1); no problems")


def test_a_run_logs_and_saves_each_derived_value_with_its_source(brain, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="dinov3ds"):
        assert main(["train", *tiny("task=segmentation", "data.dataset=nnunet", f"data.root={brain}", "head.name=linear",
                                    "data.batch_size=4", "trainer.max_steps=1", "data.eval_size=32"),
                     f"output_dir={out}"]) == 0  # fmt: skip
    assert "  data.medical.rotation = 180.0  (nnU-Net's 2D rotation range (median slice aspect 1.11 <= 1.5))" in caplog.messages
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["scale_range"] == [0.7, 1.4] and saved["data"]["image_size"] == 32  # tiny() sets 32
    assert saved["data"]["medical"]["derived"]["data.scale_range"]["source"] == "nnU-Net's scaling range"
    assert "data.image_size" not in saved["data"]["medical"]["derived"]


def test_a_prepare_volumes_folder_is_recognised_and_configured(tmp_path) -> None:
    images, labels = tmp_path / "scans", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for index in range(3):
        image, label = brain_case(index)
        nib.save(image, images / f"b{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, image.affine), labels / f"b{index}.nii.gz")
    prepare_volumes(images, labels, tmp_path / "slices", axis=0, splits={"val": ["b2"], "test": []})
    record = json.loads((tmp_path / "slices" / "volumes.json").read_text())
    assert record["volumes"][0]["spacing"] == pytest.approx(SPACING)
    config = with_overrides({}, ["task=segmentation", "data.dataset=segmentation_folder", f"data.root={tmp_path / 'slices'}",
                                 "data.class_names=[background, grey, white, other]"])  # fmt: skip
    lines = resolve_dataset_settings(config)
    assert config.inference.volume_axis == 0 and config.data.image_size == 64 and config.data.base_size == 16
    assert config.data.medical.modality == "mri" and config.data.medical.zscore_over == "slice"  # PNGs: per slice
    assert config.data.photometric is False and config.data.medical.foreground_share == 0.33
    assert "  sliced along axis 0" in lines and "data.medical.target_spacing" not in "\n".join(lines)
    record["volumes"][0].pop("shape")  # an edited record: one line naming it, not a KeyError
    (tmp_path / "slices" / "volumes.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"volumes\.json is not prepare-volumes's record \('shape'\); write the folder again"):
        resolve_dataset_settings(with_overrides({}, ["task=segmentation", "data.dataset=segmentation_folder",
                                                     f"data.root={tmp_path / 'slices'}", "data.num_classes=4"]))  # fmt: skip


def test_a_volume_z_score_maps_one_intensity_to_one_grey_in_every_slice() -> None:
    """nnU-Net normalises each image, not each slice: a voxel value becomes the same grey wherever it is (the
    per-slice z-score makes a small structure on a near-empty slice as bright as a large one elsewhere)."""
    volume = np.zeros((1, 8, 8, 4), np.float32)
    volume[0, 2:6, 2:6, 0] = 100.0  # a full slice
    volume[0, 3, 3, 1] = 100.0  # one voxel on an almost empty slice
    for over, same in (("volume", True), ("slice", False)):
        options = SlicePreprocessing(zscore_over=over, clip=3.0, gamma=None)
        ranges = channel_ranges(volume, options)
        greys = [slice_image(volume, ranges, index, 2, options)[3, 3, 0] for index in (0, 1)]
        assert bool(greys[0] == greys[1]) is same, (over, greys)


def test_rotation_and_flips_keep_labels_and_a_focused_crop_holds_its_class() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[4:7, 52:55] = 3  # far from the centre: a random 24-pixel crop mostly misses it
    image[mask == 3] = 200
    transform = SegmentationTrainTransform(24, (0.5,) * 3, (0.2,) * 3, scale_range=(1.0, 1.0), photometric=False,
                                           rotation=180, rotation_probability=1.0, vflip=True)  # fmt: skip
    torch.manual_seed(0)
    plain = sum(3 in transform(image, mask)[1] for _ in range(20))
    transform.focus = 3
    focused = [transform(image, mask)[1] for _ in range(20)]
    assert all(3 in labels for labels in focused) and plain < 15
    assert set(torch.cat([labels.flatten() for labels in focused]).tolist()) <= {0, 3, 255}  # nearest, ignore corners


class Items(torch.utils.data.Dataset):
    """Fifty 16 x 16 slices: class 1 in all, class 3 in the last one only."""

    def __init__(self, transform) -> None:
        self.transform = transform
        self.masks = [np.ones((16, 16), np.uint8) for _ in range(50)]
        self.masks[-1][10:12, 10:12] = 3

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int):
        return self.transform(np.zeros((16, 16, 3), np.uint8), self.masks[index])


def test_a_third_of_the_crops_find_a_class_in_one_slice_of_fifty() -> None:
    transform = SegmentationTrainTransform(8, (0.5,) * 3, (0.2,) * 3, scale_range=(1.0, 1.0), photometric=False)
    items = Items(transform)
    presence = class_presence(items.masks, 4)
    assert presence[:, 1].all() and presence[:, 3].sum() == 1 and not presence[:, 2].any()
    sampled = SeededSamples(ForegroundOversampling(items, transform, presence, share=1 / 3))
    hits = sum(3 in sampled[(index % 50, seed)][1] for seed, index in enumerate(range(300)))
    assert 30 <= hits <= 80  # a third forced, half of those onto class 3 (classes 1 and 3 drawn uniformly)
    assert transform.focus is None
    again = SeededSamples(ForegroundOversampling(items, transform, presence, share=1 / 3))
    assert all(torch.equal(sampled[(i, 7 * i)][1], again[(i, 7 * i)][1]) for i in range(20))  # seeded: resumable
