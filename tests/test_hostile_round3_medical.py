"""Hostile inputs, round 3 (issue 31), medical part: nnU-Net / MSD datasets, volume reading, `predict` on volumes.

The rows run through the real CLI as the corpus of `tests/test_hostile_inputs.py` does: exit 2, one line on
stderr matching the row's pattern, no file outside the output folder changed. Cases whose right answer is a
result (an ignore label masked out, a label on the image's grid scored) are the small tests below the rows.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov3ds.cli import main
from dinov3ds.config import with_overrides
from dinov3ds.data.build import resolve_dataset_settings
from dinov3ds.data.nnunet import IGNORE_CLASS, load_case, mask_ignored, read_nnunet
from dinov3ds.data.synthetic import make_nnunet_dataset
from dinov3ds.data.volumes import load_volume
from dinov3ds.errors import UserError
from dinov3ds.training.tasks import SegmentationTask
from tests import test_hostile_inputs as corpus
from tests.conftest import tiny
from tests.test_hostile_inputs import Workspace, edit_checkpoint

trained, workspace, offline = corpus.trained, corpus.workspace, corpus.offline  # the corpus's fixtures, registered here

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (12, 12, 4)


def volume(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).random(SHAPE, np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def moved(shift=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 2.0), flip: bool = False) -> np.ndarray:
    affine = np.diag([*scale, 1.0])
    affine[0, 0] *= -1 if flip else 1
    affine[:3, 3] = shift
    return affine


def medical_checkpoint(w: Workspace, **data) -> Path:
    """The corpus's trained 3-class segmenter, marked as trained on MRI slices (what predict needs for volumes)."""
    return edit_checkpoint(w.segmentation_checkpoint, w.root / "med.ckpt",
                           lambda c: c["dinov3ds"]["config"]["data"].update({"medical": {}, **data}))  # fmt: skip


def predict_volumes(w: Workspace, *inputs: Path, labels: Path | None = None) -> list[str]:
    return ["predict", "--checkpoint", str(medical_checkpoint(w)), *map(str, inputs), "--out", str(w.root / "out"),
            *(["--labels", str(labels)] if labels else [])]  # fmt: skip


def scan_and_label(w: Workspace, label_affine: np.ndarray = AFFINE, label_shape=SHAPE, label: np.ndarray | None = None) -> list[str]:
    scan = volume(w.root / "scans" / "case.nii.gz")
    volume(w.root / "labels" / "case.nii.gz", np.zeros(label_shape, np.uint8) if label is None else label, label_affine)
    return predict_volumes(w, scan, labels=w.root / "labels")


def dataset(w: Workspace, change: Callable[[Path], object] = lambda root: None) -> Path:
    """A tiny nnU-Net v2 raw dataset (2 MRI channels, labels 0/1/2, 3 training cases), then `change` applied."""
    root = make_nnunet_dataset(w.root / "Dataset001", training=3, test=0, shape=SHAPE)
    change(root)
    return root


def train_nnunet(w: Workspace, change: Callable[[Path], object] = lambda root: None, *extra: str) -> list[str]:
    root = dataset(w, change)
    return ["train", *tiny("task=segmentation", "data.dataset=nnunet", f"data.root={root}", "head.name=linear",
                           "trainer.max_epochs=1", *extra), f"output_dir={w.root / 'out'}"]  # fmt: skip


def spec(root: Path, **changes) -> None:
    path = root / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def splits(root: Path, folds) -> None:
    (root / "splits_final.json").write_text(json.dumps(folds))


def with_label_values(root: Path, case: str, values: dict[tuple[int, int, int], float]) -> None:
    path = root / "labelsTr" / f"{case}.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).astype(np.float32)
    for voxel, value in values.items():
        data[voxel] = value
    nib.save(nib.Nifti1Image(data, image.affine), path)


def gzip_bomb(path: Path, shape=(1100, 1100, 1100), dtype=np.float64) -> Path:
    """A few-KB .nii.gz whose header declares `shape` voxels of `dtype` (10.6 GB here, under the voxel limit)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    buffer = io.BytesIO()
    buffer.write(header.binaryblock + b"\0" * 4)  # vox_offset 352
    buffer.write(b"\0" * 4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


def prepare(w: Workspace, *extra: str) -> list[str]:
    return ["prepare-volumes", "--images", str(w.root / "vol" / "images"), "--labels", str(w.root / "vol" / "labels"),
            "--out", str(w.root / "out"), "--val-fraction", "0", *extra]  # fmt: skip


def fractional_pair(w: Workspace) -> list[str]:
    label = np.zeros(SHAPE, np.float32)
    label[2, 3, 1], label[5, 5, 2] = 1.7, 0.5
    volume(w.root / "vol" / "images" / "case.nii.gz")
    volume(w.root / "vol" / "labels" / "case_seg.nii.gz", label)
    return prepare(w)


def one_empty_val_volume(w: Workspace) -> list[str]:
    label = np.zeros(SHAPE, np.uint8)
    label[3:6, 3:6, 1:3] = 1
    for name, data in (("a", label), ("b", np.zeros(SHAPE, np.uint8))):
        volume(w.root / "vol" / "images" / f"{name}.nii.gz")
        volume(w.root / "vol" / "labels" / f"{name}_seg.nii.gz", data)
    return ["prepare-volumes", "--images", str(w.root / "vol" / "images"), "--labels", str(w.root / "vol" / "labels"),
            "--out", str(w.root / "out"), "--val", "b", "--skip-empty"]  # fmt: skip


def empty_segmentation_val(w: Workspace) -> list[str]:
    for folder in ("images", "annotations"):
        for path in (w.segmentation_data / folder / "val").iterdir():
            path.unlink()
    return ["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={w.segmentation_data}",
                           "data.num_classes=3", "head.name=linear", "trainer.max_epochs=1"), f"output_dir={w.root / 'out'}"]  # fmt: skip


def two_folders_one_case(w: Workspace) -> list[str]:
    first, second = volume(w.root / "a" / "case_0000.nii.gz"), volume(w.root / "b" / "case_0000.nii.gz")
    return predict_volumes(w, first.parent, second.parent)


def file_beside_channel_file(w: Workspace) -> list[str]:
    volume(w.root / "a" / "case.nii.gz"), volume(w.root / "a" / "case_0000.nii.gz")
    return predict_volumes(w, w.root / "a")


def duplicate_msd_keys(root: Path) -> None:
    (root / "dataset.json").write_text('{"modality": {"0": "T1", "1": "T2"}, '
                                       '"labels": {"0": "background", "1": "organ", "1": "lesion"}}')  # fmt: skip


def reshaped_channel(root: Path) -> None:
    volume(root / "imagesTr" / "phantom_001_0001.nii.gz", np.zeros((12, 12, 3), np.float32),
           nib.load(root / "imagesTr" / "phantom_001_0000.nii.gz").affine)  # fmt: skip


# (row id, build the inputs and return the command line, the one error line must match)
CASES: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    ("r3-04-one-case-in-two-input-folders", two_folders_one_case,
     r"a/case_0000\.nii\.gz and \S*b/case_0000\.nii\.gz are both case 'case'; .* separate runs"),
    ("r3-04-case-file-beside-its-channel-file", file_beside_channel_file,
     r"case(_0000)?\.nii\.gz and \S*case(_0000)?\.nii\.gz are both channel 0 of case case"),
    ("r3-05-label-origin-differs", lambda w: scan_and_label(w, moved(shift=(3.0, 0.0, 0.0))),
     r"labels/case\.nii\.gz and \S*scans/case\.nii\.gz have different affines: origin \[3\.0, 0\.0, 0\.0\] vs "
     r"\[0\.0, 0\.0, 0\.0\] \(tolerance 0\.0001 mm"),
    ("r3-05-label-spacing-differs", lambda w: scan_and_label(w, moved(scale=(1.0, 1.0, 3.0))),
     r"have different affines: spacing \[1\.0, 1\.0, 3\.0\] vs \[1\.0, 1\.0, 2\.0\]"),
    ("r3-05-label-direction-differs", lambda w: scan_and_label(w, moved(flip=True)), r"have different affines: direction"),
    ("r3-05-label-shape-differs", lambda w: scan_and_label(w, label_shape=(12, 12, 3)),
     r"labels/case\.nii\.gz has shape \(12, 12, 3\) but \S*scans/case\.nii\.gz has shape \(12, 12, 4\)"),
    ("r3-06-ignore-label-not-the-highest-id",
     lambda w: train_nnunet(w, lambda r: spec(r, labels={"background": 0, "ignore": 1, "organ": 2})),
     r'dataset\.json: the "ignore" label \(1\) must have the highest id'),
    ("r3-06-ignore-label-with-another-ignore-index",
     lambda w: train_nnunet(w, lambda r: spec(r, labels={"background": 0, "organ": 1, "lesion": 2, "ignore": 3}),
                            "data.ignore_index=7"),
     r"data\.ignore_index is 7, but \S*dataset\.json's \"ignore\" label is read as 255; remove data\.ignore_index"),
    ("r3-07-case-in-train-and-val",
     lambda w: train_nnunet(w, lambda r: splits(r, [{"train": ["phantom_000", "phantom_001"], "val": ["phantom_001", "phantom_002"]}])),
     r"splits_final\.json: fold 0 puts 1 case\(s\) in both train and val \(phantom_001\)"),
    ("r3-07-case-twice-in-train",
     lambda w: train_nnunet(w, lambda r: splits(r, [{"train": ["phantom_000", "phantom_000"], "val": ["phantom_002"]}])),
     r"splits_final\.json: fold 0 lists 'phantom_000' twice in \"train\""),
    ("r3-08-msd-file-beside-channel-files",
     lambda w: train_nnunet(w, lambda r: shutil.copy(r / "imagesTr" / "phantom_000_0000.nii.gz", r / "imagesTr" / "phantom_000.nii.gz")),
     r"imagesTr: 1 file\(s\) match no channel pattern <case>_0000\.nii\.gz\.\.<case>_0001\.nii\.gz \(phantom_000\.nii\.gz\)"),
    ("r3-09-channel-file-beyond-channel-names",
     lambda w: train_nnunet(w, lambda r: shutil.copy(r / "imagesTr" / "phantom_001_0000.nii.gz", r / "imagesTr" / "phantom_001_0002.nii.gz")),
     r"imagesTr: 1 file\(s\) of a channel beyond the 2 that channel_names lists \(phantom_001_0002\.nii\.gz\)"),
    ("r3-10-fractional-label-nnunet",
     lambda w: train_nnunet(w, lambda r: with_label_values(r, "phantom_002", {(1, 2, 0): 0.5, (5, 5, 2): 1.7})),
     r"phantom_002\.nii\.gz: label value 0\.5 at voxel \(1, 2, 0\) is not an integer class id"),
    ("r3-10-fractional-label-prepare-volumes", fractional_pair,
     r"case_seg\.nii\.gz: label value 1\.7 at voxel \(2, 3, 1\) is not an integer class id"),
    ("r3-10-fractional-label-predict", lambda w: scan_and_label(w, label=np.full(SHAPE, 0.5, np.float32)),
     r"labels/case\.nii\.gz: label value 0\.5 at voxel \(0, 0, 0\) is not an integer class id"),
    ("r3-20-gzip-bomb-prepare-volumes",
     lambda w: prepare(w) if (gzip_bomb(w.root / "vol" / "images" / "case.nii.gz"),
                              volume(w.root / "vol" / "labels" / "case_seg.nii.gz", np.zeros(SHAPE, np.uint8))) else [],
     r"case\.nii\.gz: its header declares 1100 x 1100 x 1100 float64 voxels = 10,648,000,000 bytes decoded, over "
     r"the limit of 8,589,934,592; .*DINOV3DS_MAX_VOLUME_BYTES"),
    ("r3-20-gzip-bomb-predict", lambda w: predict_volumes(w, gzip_bomb(w.root / "scans" / "bomb.nii.gz")),
     r"bomb\.nii\.gz: its header declares 1100 x 1100 x 1100 float64 voxels"),
    ("r3-22-channels-of-different-shapes", lambda w: train_nnunet(w, reshaped_channel),
     r"phantom_001_0001\.nii\.gz has shape \(12, 12, 3\) but \S*phantom_001_0000\.nii\.gz has shape \(12, 12, 4\)"),
    ("r3-23-splits-without-val", lambda w: train_nnunet(w, lambda r: splits(r, [{"train": ["phantom_000"]}])),
     r"splits_final\.json: fold 0 has no \"val\" list of case ids"),
    ("r3-24-fold-as-a-list-in-splits", lambda w: train_nnunet(w, lambda r: splits(r, [["phantom_000"], ["phantom_001"]])),
     r"splits_final\.json is not a list of folds"),
    ("r3-24-fold-as-a-list-in-the-config", lambda w: train_nnunet(w, lambda r: None, "data.fold=[0, 1]"),
     r"'data\.fold': Input should be a valid integer"),
    ("r3-25-channel-names-not-numbers",
     lambda w: train_nnunet(w, lambda r: spec(r, channel_names={"T1": "T1", "T2": "T2"})),
     r"dataset\.json: channel_names key 'T1' is not a channel number"),
    ("r3-25-channel-numbers-with-a-gap",
     lambda w: train_nnunet(w, lambda r: spec(r, channel_names={"0": "T1", "2": "T2"})),
     r"dataset\.json: channel_names numbers \[0, 2\] are not 0\.\.1"),
    ("r3-31-duplicate-label-ids",
     lambda w: train_nnunet(w, lambda r: spec(r, labels={"background": 0, "organ": 1, "lesion": 1})),
     r"dataset\.json: labels '(organ|lesion)' and '(organ|lesion)' have the same id 1"),
    ("r3-31-duplicate-label-keys", lambda w: train_nnunet(w, duplicate_msd_keys), r"dataset\.json: key '1' appears twice"),
    ("r3-33-negative-label-id",
     lambda w: train_nnunet(w, lambda r: spec(r, labels={"background": 0, "organ": 1, "lesion": -2})),
     r"dataset\.json: label 'lesion' has id -2; label ids are 0\.\.65535"),
    ("r3-32-empty-val-fold",
     lambda w: train_nnunet(w, lambda r: splits(r, [{"train": ["phantom_000", "phantom_001"], "val": []}])),
     r"splits_final\.json: fold 0 has an empty \"val\" list"),
    ("r3-32-skip-empty-leaves-val-empty", one_empty_val_volume, r"--skip-empty would leave split val with no slices"),
    ("r3-32-empty-segmentation-val-split", empty_segmentation_val, r"no image/mask pairs under \S*images/val"),
]  # fmt: skip


@pytest.mark.parametrize("case, build, message", CASES, ids=[case[0] for case in CASES])
def test_round3_medical_input_is_one_line_exit_2_and_loses_nothing(case, build, message, workspace, offline, capsys):
    corpus.assert_refused(build(workspace), workspace.root, message, capsys)
    if case.startswith("r3-32-"):  # said before anything is written
        assert not (workspace.root / "out").exists(), sorted((workspace.root / "out").rglob("*"))


# --- handled correctly ----------------------------------------------------------------------------------


def test_r3_05_a_label_on_the_images_grid_within_tolerance_is_scored(workspace, capsys):
    """Header round-off (origin 2e-5 mm off) is the same grid: scored, not refused."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:8, 2:8, 1:3] = 1
    assert main(scan_and_label(workspace, moved(shift=(2e-5, 0.0, 0.0)), label=label)) == 0
    assert json.loads((workspace.root / "out" / "metrics.json").read_text())["cases"] == 1


def ignore_dataset(root: Path) -> Path:
    """The tiny dataset with nnU-Net's ignore label (id 3) painted over a block of each training label."""
    make_nnunet_dataset(root, training=3, test=0, shape=SHAPE)
    spec(root, labels={"background": 0, "organ": 1, "lesion": 2, "ignore": 3})
    for path in (root / "labelsTr").iterdir():
        image = nib.load(path)
        data = np.asarray(image.dataobj).copy()
        data[:4, :4, :] = 3
        nib.save(nib.Nifti1Image(data, image.affine), path)
    return root


def test_r3_06_the_ignore_label_is_no_class_and_counts_in_no_loss(tmp_path):
    root = ignore_dataset(tmp_path / "Dataset002")
    dataset = read_nnunet(root)
    assert dataset.class_names == ("background", "organ", "lesion") and dataset.ignore_value == 3
    _, label, _ = load_case(dataset.training[0], dataset)
    assert (label[:4, :4, :] == IGNORE_CLASS).all() and set(np.unique(label[4:, 4:, :])) <= {0, 1, 2}
    config = with_overrides({}, tiny("task=segmentation", "data.dataset=nnunet", f"data.root={root}", "head.name=linear"))
    resolve_dataset_settings(config)
    assert config.data.num_classes == 3 and config.data.label_map == {0: 0, 1: 1, 2: 2, 3: IGNORE_CLASS}
    task = SegmentationTask(config, 3, list(dataset.class_names))
    import torch

    logits = torch.randn(1, 3, *label.shape[:2], requires_grad=True)
    target = torch.from_numpy(label[:, :, 1].astype(np.int64))[None]
    task.criterion(logits, target).backward()
    assert logits.grad[..., :4, :4].abs().max() == 0  # the ignored voxels teach nothing
    prediction, reference = mask_ignored(np.ones(label.shape, np.int64), label)
    assert (prediction[:4, :4] == 0).all() and (reference[:4, :4] == 0).all()


def test_r3_06_predict_never_writes_the_ignore_label_and_scores_without_it(workspace, capsys):
    """A label file that is the prediction itself, with the ignore label painted over a block: every class
    scores Dice 1 (the block counts for nothing), and no prediction holds the ignore id."""
    checkpoint = medical_checkpoint(workspace, label_map={3: IGNORE_CLASS})
    scan = volume(workspace.root / "scans" / "case.nii.gz")
    assert main(["predict", "--checkpoint", str(checkpoint), str(scan), "--out", str(workspace.root / "first")]) == 0
    predicted = np.asarray(nib.load(workspace.root / "first" / "case_pred.nii.gz").dataobj)
    assert 3 not in np.unique(predicted)
    truth = predicted.copy()
    truth[:5, :5, :] = 3
    volume(workspace.root / "labels" / "case.nii.gz", truth)
    assert main(["predict", "--checkpoint", str(checkpoint), str(scan), "--labels", str(workspace.root / "labels"),
                 "--out", str(workspace.root / "second")]) == 0  # fmt: skip
    summary = json.loads((workspace.root / "second" / "metrics.json").read_text())
    dice = [values["dice"] for values in summary["per_class"].values()]  # None: a class in neither (not scored)
    assert set(dice) <= {1.0, None} and 1.0 in dice, summary["per_class"]


def test_r3_08_an_msd_folder_of_single_files_is_still_read(tmp_path):
    root = make_nnunet_dataset(tmp_path / "Task01", training=2, test=0, shape=SHAPE)
    for case in ("phantom_000", "phantom_001"):
        files = [root / "imagesTr" / f"{case}_{c:04d}.nii.gz" for c in (0, 1)]
        affine, channels = nib.load(files[0]).affine, [np.asarray(nib.load(f).dataobj) for f in files]
        for path in files:
            path.unlink()
        volume(root / "imagesTr" / f"{case}.nii.gz", np.stack(channels, axis=-1), affine)
    dataset = read_nnunet(root)
    assert [case.images[0].name for case in dataset.training] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert load_case(dataset.training[0], dataset)[0].shape == (2, *SHAPE)


def test_r3_20_the_volume_byte_limit_is_named_and_can_be_raised(tmp_path, monkeypatch):
    path = volume(tmp_path / "scan.nii.gz")  # 12 x 12 x 4 float32 = 2,304 bytes
    monkeypatch.setenv("DINOV3DS_MAX_VOLUME_BYTES", "2000")
    with pytest.raises(UserError, match=r"2,304 bytes decoded, over the limit of 2,000; .*raise DINOV3DS_MAX_VOLUME_BYTES"):
        load_volume(path)
    monkeypatch.setenv("DINOV3DS_MAX_VOLUME_BYTES", "2304")
    assert load_volume(path).shape == SHAPE
    monkeypatch.setenv("DINOV3DS_MAX_VOLUME_BYTES", "lots")
    with pytest.raises(UserError, match=r"DINOV3DS_MAX_VOLUME_BYTES='lots' is not a whole number"):
        load_volume(path)


def test_r3_check_data_lists_every_broken_nnunet_case(workspace, capsys):
    """check-data reads an nnU-Net dataset as training does and lists each broken case, not only the first."""
    root = dataset(workspace)
    config = workspace.root / "nnunet.yaml"
    config.write_text(f"task: segmentation\ndata: {{dataset: nnunet, root: {root}}}\nhead: {{name: linear}}\n")
    assert main(["check-data", "--config", str(config)]) == 0
    assert "cases checked (train: 2, val: 1); no problems" in capsys.readouterr().out
    with_label_values(root, "phantom_000", {(0, 0, 0): 0.5})
    reshaped_channel(root)
    assert main(["check-data", "--config", str(config)]) == 2
    out = capsys.readouterr().out
    assert "phantom_000.nii.gz: label value 0.5 at voxel (0, 0, 0)" in out and "phantom_001_0001.nii.gz has shape" in out
    assert "cases checked (train: 2, val: 1); 2 problems" in out
