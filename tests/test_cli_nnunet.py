"""Medical data as challenges ship it, end to end through the CLI: an nnU-Net v2 raw dataset (2 MRI channels,
3 labels, 0.9 x 0.9 x 3 mm voxels) and a CT one in Hounsfield units, trained a few epochs on a tiny random
backbone; `predict` on imagesTs, on DICOM, with labels; `eval` per class in 3D; resume and two processes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov3ds.cli import main
from dinov3ds.config import with_overrides
from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data.build import resolve_dataset_settings
from dinov3ds.data.nnunet import class_indices, load_case, read_nnunet
from dinov3ds.data.synthetic import make_nnunet_dataset
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import read_checkpoint
from tests.conftest import tiny
from tests.test_dicom import write_series

TRAIN = ["task=segmentation", "data.dataset=nnunet", "data.image_size=48", "data.scale_range=[1.0, 1.0]",
         "data.photometric=false", "data.batch_size=8", "head.name=unet_sum",
         "head.options={base_channels: 32, image_channels: 8}", "optim.lr=3e-3", "loss.name=ce+dice",
         "trainer.check_val_every_n_epoch=10"]  # fmt: skip


@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("mri")
    root = make_nnunet_dataset(work / "Dataset001_Phantom", training=6, test=2)
    assert main(["train", *tiny(*TRAIN, f"data.root={root}", "trainer.max_epochs=20", depth=2),
                 f"output_dir={work / 'run'}"]) == 0  # fmt: skip
    return root, work / "run" / "checkpoints" / "last.ckpt"


def test_training_logs_dice_per_class_and_saves_the_dataset_facts(mri) -> None:
    root, checkpoint = mri
    saved = read_checkpoint(checkpoint)
    assert saved.class_names == ["background", "organ", "lesion"]
    medical = saved.config["data"]["medical"]
    assert medical["modality"] == "mri" and medical["volume_channels"] == 2
    with open(checkpoint.parents[1] / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/Dice_organ")]
    assert float(rows[-1]["val/Dice_organ"]) >= 0.6 and float(rows[-1]["val/Dice_lesion"]) >= 0.1, rows[-1]


def test_predict_imagests_writes_labels_on_each_inputs_grid(mri, tmp_path) -> None:
    root, checkpoint = mri
    assert main(["predict", "--checkpoint", str(checkpoint), str(root / "imagesTs"), "--out", str(tmp_path / "p"),
                 "--probabilities"]) == 0  # fmt: skip
    for case in ("phantom_006", "phantom_007"):
        source = nib.load(root / "imagesTs" / f"{case}_0000.nii.gz")
        predicted = nib.load(tmp_path / "p" / f"{case}_pred.nii.gz")
        assert predicted.shape == source.shape and np.allclose(predicted.affine, source.affine)
        assert predicted.header.get_zooms() == pytest.approx(source.header.get_zooms())
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2}
        probabilities = nib.load(tmp_path / "p" / f"{case}_prob.nii.gz")
        assert probabilities.shape == (*source.shape, 3)
        np.testing.assert_allclose(np.asarray(probabilities.dataobj).sum(-1), 1, atol=1e-4)


def test_predict_with_labels_and_eval_report_3d_metrics_per_class(mri, tmp_path) -> None:
    root, checkpoint = mri
    out = tmp_path / "with_labels"
    assert main(["predict", "--checkpoint", str(checkpoint), str(root / "imagesTr"), "--labels",
                 str(root / "labelsTr"), "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["cases"] == 6 and set(summary["per_class"]) == {"organ", "lesion"}
    assert summary["per_class"]["organ"]["dice"] >= 0.6
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert len(rows) == 12 and {r["class"] for r in rows} == {"organ", "lesion"}
    assert all(float(r["hd95"]) >= 0 or r["hd95"] == "nan" for r in rows)  # nan: a class missed (MONAI's HD95)

    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert evaluated["cases"] == 1  # 6 cases, val_fraction 0.2
    assert set(evaluated["per_class"]) == {"organ", "lesion"}


def test_a_rerun_with_resume_skips_finished_volumes(mri, tmp_path, capsys) -> None:
    root, checkpoint = mri
    out = tmp_path / "resumed"
    args = ["predict", "--checkpoint", str(checkpoint), str(root / "imagesTs"), "--out", str(out)]
    assert main(args) == 0
    first = out / "phantom_006_pred.nii.gz"
    (out / "phantom_007_pred.nii.gz").unlink()  # as if the run was killed before this volume
    stamp = first.stat().st_mtime_ns
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # nothing is replaced silently
    assert main([*args, "--resume"]) == 0
    assert "predicting 1 volumes; 1 were done before" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp and (out / "phantom_007_pred.nii.gz").is_file()


def test_two_processes_write_what_one_writes(mri, tmp_path) -> None:
    root, checkpoint = mri
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        command = [sys.executable, "-m", "dinov3ds", "predict", "--checkpoint", str(checkpoint), str(root / "imagesTs"),
                   "--out", str(out), "--device", "cpu", "--devices", str(devices)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[devices] = {p.name: np.asarray(nib.load(p).dataobj) for p in out.glob("*_pred.nii.gz")}
    assert sorted(outputs[1]) == sorted(outputs[2]) == ["phantom_006_pred.nii.gz", "phantom_007_pred.nii.gz"]
    for name, labels in outputs[1].items():
        np.testing.assert_array_equal(labels, outputs[2][name])


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("ct")
    root = make_nnunet_dataset(work / "Dataset002_CT", training=4, test=1, modality="ct")
    assert main(["train", *tiny(*TRAIN, f"data.root={root}", "trainer.max_epochs=2", depth=2),
                 f"output_dir={work / 'run'}"]) == 0  # fmt: skip
    return root, work / "run" / "checkpoints" / "last.ckpt"


def test_ct_range_is_the_training_foregrounds_percentiles(ct) -> None:
    root, checkpoint = ct
    medical = SlicePreprocessing(**read_checkpoint(checkpoint).config["data"]["medical"])
    dataset = read_nnunet(root)
    train_cases, _ = dataset.split(0, 0.2, 0)
    foreground = np.concatenate([load_case(c, dataset)[0][0][load_case(c, dataset)[1] > 0] for c in train_cases])
    assert medical.modality == "ct"
    assert medical.intensity_range == pytest.approx(tuple(np.percentile(foreground, (0.5, 99.5))), abs=1e-3)
    assert 25 < medical.intensity_range[0] < 70 < 150 < medical.intensity_range[1] < 200  # organ 70, lesion 150 HU, noise 12


def test_dataset_json_modality_holds_when_the_config_sets_other_medical_keys(ct) -> None:
    """`data.medical: {context: 1}` on a CT dataset is 2.5D CT, not MRI defaults (found by benchmarks/medical.py:
    the 2.5D model was trained on z-scored slices of a CT and reached Dice 0.2)."""
    root, _ = ct
    config = with_overrides({}, tiny(*TRAIN, f"data.root={root}", "data.medical={context: 1}"))
    resolve_dataset_settings(config)
    assert config.data.medical.modality == "ct" and config.data.medical.context == 1
    assert config.data.medical.intensity_range is not None
    explicit = with_overrides({}, tiny(*TRAIN, f"data.root={root}", "data.medical={modality: mri}"))
    resolve_dataset_settings(explicit)
    assert explicit.data.medical.modality == "mri"  # named in the config: the user's choice wins
    with pytest.raises(UserError, match=r"dataset\.json says CT, and gamma apply to MRI only"):
        resolve_dataset_settings(with_overrides({}, tiny(*TRAIN, f"data.root={root}", "data.medical={gamma: 0.5}")))


def test_ct_model_predicts_a_dicom_series_on_its_geometry(ct, tmp_path) -> None:
    pytest.importorskip("pydicom")
    _, checkpoint = ct
    write_series(tmp_path / "scans" / "series1")
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "scans"), "--out", str(tmp_path / "p")]) == 0
    from dinov3ds.data.dicom import load_dicom_series

    source = load_dicom_series(tmp_path / "scans" / "series1")
    predicted = nib.load(tmp_path / "p" / "series1_pred.nii.gz")
    assert predicted.shape == source.shape == (128, 128, 7)
    np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-5)


# --- what the reader refuses, one line each ---------------------------------------------------------------


def broken_copy(root: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    target = tmp_path / name
    shutil.copytree(root, target)
    return target


def test_inconsistent_datasets_are_one_line_errors(mri, tmp_path) -> None:
    root, _ = mri
    missing_channel = broken_copy(root, tmp_path, "no_channel")
    (missing_channel / "imagesTr" / "phantom_002_0001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"phantom_002 lacks channel file phantom_002_0001\.nii\.gz"):
        read_nnunet(missing_channel)
    no_label = broken_copy(root, tmp_path, "no_label")
    (no_label / "labelsTr" / "phantom_001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"phantom_001 has no label"):
        read_nnunet(no_label)
    moved = broken_copy(root, tmp_path, "moved")
    label = nib.load(moved / "labelsTr" / "phantom_000.nii.gz")
    shifted = label.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), moved / "labelsTr" / "phantom_000.nii.gz")
    dataset = read_nnunet(moved)
    with pytest.raises(UserError, match="different affines"):
        load_case(dataset.training[0], dataset)
    with pytest.raises(UserError, match=r"label values \[7\] that dataset.json does not name"):
        class_indices(np.array([0, 1, 7]), dataset, Path("x.nii.gz"))
    (moved / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"tumour": [1, 2], "background": 0}}))
    with pytest.raises(UserError, match="region-based labels are not supported"):
        read_nnunet(moved)


def test_msd_style_dataset_json_and_stored_label_ids(tmp_path) -> None:
    """MSD's {"modality": ..., "labels": {"0": name}} and non-consecutive ids (BraTS: 0, 1, 2, 4)."""
    root = make_nnunet_dataset(tmp_path / "Task01", training=2, test=0)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T1", "1": "T2"},
                                                   "labels": {"0": "background", "1": "organ", "4": "lesion"}}))  # fmt: skip
    dataset = read_nnunet(root)
    assert dataset.class_names == ("background", "organ", "lesion") and dataset.label_values == (0, 1, 4)
    np.testing.assert_array_equal(class_indices(np.array([0, 4, 1, 4]), dataset, root), [0, 2, 1, 2])
