"""End-to-end head-MRI segmentation through the `dinov3ds` CLI: NIfTI volumes → slices → training → volumes.

Synthetic T1-like head phantoms (`make_head_phantom`: layered ellipsoid with ventricles and nuclei, bias field,
Rician noise, anisotropic 1 x 1 x 2.5 mm affine) go through `prepare-volumes`, a small random-weight ViT-S/16
(2 blocks) with a narrow UNet head is trained with the shipped `configs/segmentation_mri_head.yaml` plus
size/epoch/weight overrides, and `predict` segments a held-out volume: the prediction must sit on the input's
grid (shape, affine, qform/sform) and reach Dice >= 0.9 against its label. Bad NIfTI input must end in exit
code 2 with one error line, never a traceback.

Commands go through `dinov3ds.cli.main` (what the console script calls) in this process, because importing
torch + Lightning costs several seconds per process; one `python -m dinov3ds prepare-volumes` subprocess (which
imports neither) checks the real exit code and stderr. Training is done once per module (~1 minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_head_phantom
from dinov3ds.metrics import dice_and_iou

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "segmentation_mri_head.yaml"
SHAPE = (48, 48, 24)  # 48 x 48 slices along axis 2 (3 x 3 patches), 24 slices per volume
TRAIN_VOLUMES = 6  # prepare-volumes puts 5 in train and 1 in val
HELDOUT_SEED = 100
DICE_THRESHOLD = 0.9

# The shipped config with what makes it a CPU smoke run: tiny random backbone, 48 px crops, narrow head, a
# higher lr with a short warm-up (the config's 1e-4 / 200 steps are for thousands of real slices), 6 epochs.
OVERRIDES = [
    "backbone.weights=random",
    "backbone.overrides={depth: 2}",
    "data.image_size=48",
    "data.base_size=48",
    "data.batch_size=16",
    "data.num_workers=0",
    "head.options={base_channels: 32, image_channels: 16}",
    "optim.lr=1e-3",
    "optim.warmup_steps=5",
    "trainer.max_epochs=6",
    "trainer.check_val_every_n_epoch=3",
    "trainer.precision=32",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=5",
]


@dataclass
class Trained:
    root: Path
    checkpoint: Path
    heldout: Path
    heldout_label: Path


def oblique(image: nib.Nifti1Image, degrees: float = 12.0) -> nib.Nifti1Image:
    """The same voxels on a rotated grid with scanner qform and aligned sform, like a real oblique acquisition."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine = rotation @ image.affine
    result = nib.Nifti1Image(np.asanyarray(image.dataobj), affine, image.header)
    result.set_qform(affine, code=1)
    result.set_sform(affine, code=2)
    return result


def write_pair(
    folder: Path, label_folder: Path, name: str, seed: int, label_suffix: str = "_seg"
) -> tuple[Path, Path]:
    image, label = make_head_phantom(SHAPE, seed=seed)
    image, label = oblique(image), oblique(label)
    folder.mkdir(parents=True, exist_ok=True)
    label_folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}.nii.gz", label_folder / f"{name}{label_suffix}.nii.gz"
    nib.save(image, paths[0])
    nib.save(label, paths[1])
    return paths


def run_cli(*args: object, capsys: pytest.CaptureFixture | None = None) -> str:
    """`dinov3ds <args>` in this process; fails with the command's output unless it exits 0."""
    code = main([str(a) for a in args])
    out = err = ""
    if capsys is not None:
        out, err = capsys.readouterr()
    assert code == 0, f"dinov3ds {' '.join(map(str, args))} exited {code}\n{out}\n{err}"
    return out


def error_of(args: list[object], capsys: pytest.CaptureFixture) -> str:
    """Run a command that must fail as a user error: exit 2, one `dinov3ds: error:` line, no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, f"expected exit code 2, got {code}\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dinov3ds: error: "), err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], f"the error must be the last line:\n{err}"
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Phantoms → prepare-volumes → train, once for the module; returns the best checkpoint and a held-out scan."""
    root = tmp_path_factory.mktemp("mri")
    threads = torch.get_num_threads()
    # One thread: tiny tensors gain nothing from two, and OpenMP threads spin against each other on a busy runner.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOV3DS_CACHE", str(root / "cache"))
        patch.setenv("DINOV3DS_CHECKPOINTS", str(root / "no_checkpoints"))
        for seed in range(TRAIN_VOLUMES):
            write_pair(root / "scans", root / "labels", f"case{seed}", seed)
        heldout, heldout_label = write_pair(root, root, "heldout", HELDOUT_SEED, label_suffix="_label")
        slices = root / "mri_slices"
        run_cli(
            "prepare-volumes",
            "--images",
            root / "scans",
            "--labels",
            root / "labels",
            "--out",
            slices,
            "--axis",
            2,
        )
        summary = json.loads((slices / "volumes.json").read_text())
        assert summary["slices"] == {"train": 5 * SHAPE[2], "val": SHAPE[2], "test": 0}
        run = root / "run"
        run_cli("train", "--config", CONFIG, f"data.root={slices}", f"output_dir={run}", *OVERRIDES)
        torch.set_num_threads(threads)
    checkpoint = run / "checkpoints" / "best.ckpt"
    assert checkpoint.is_file(), "training wrote no best.ckpt"
    return Trained(root, checkpoint, heldout, heldout_label)



def check_on_grid(prediction: Path, reference: Path) -> np.ndarray:
    """The prediction has the reference's shape, affine (exactly), qform/sform and zooms; returns its labels."""
    assert prediction.is_file(), f"{prediction} was not written"
    predicted, image = nib.load(prediction), nib.load(reference)
    assert predicted.shape == image.shape
    np.testing.assert_array_equal(predicted.affine, image.affine)
    for coded in ("get_qform", "get_sform"):
        got, expected = getattr(predicted.header, coded)(coded=True), getattr(image.header, coded)(coded=True)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1] == expected[1], f"{coded} code {got[1]} != {expected[1]}"
    assert predicted.header.get_zooms() == image.header.get_zooms()
    assert predicted.get_data_dtype() == np.uint8
    labels = np.asanyarray(predicted.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1}
    return labels


@pytest.mark.slow
def test_train_on_slices_then_predict_heldout_volume(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    run = trained.checkpoint.parents[1]
    val_dice = json.loads((run / "val_metrics.json").read_text())["mDice"]
    out = trained.root / "pred_single"
    printed = run_cli("predict", "--checkpoint", trained.checkpoint, trained.heldout, "--labels", trained.heldout_label,
                      "--out", out, capsys=capsys)  # fmt: skip
    labels = check_on_grid(out / "heldout_pred.nii.gz", trained.heldout)
    truth = np.asanyarray(nib.load(trained.heldout_label).dataobj)
    dice = dice_and_iou(labels, truth)["dice"]
    assert dice >= DICE_THRESHOLD, f"held-out Dice {dice:.3f} < {DICE_THRESHOLD} (val mDice {val_dice:.3f})"
    # The Dice the command reports is the one computed here from its output file.
    assert f"heldout.nii.gz: Dice {dice:.4f}" in printed, printed
    report = json.loads((out / "volumes.jsonl").read_text().splitlines()[0])
    assert report["dice"] == pytest.approx(dice) and Path(report["prediction"]) == out / "heldout_pred.nii.gz"
    print(f"held-out Dice {dice:.4f} (val mDice {val_dice:.4f})")


@pytest.mark.slow
def test_predict_folder_of_volumes_with_label_folder(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    scans, labels = trained.root / "folder_scans", trained.root / "folder_labels"
    for name, seed in (("a", 201), ("b", 202)):
        write_pair(scans, labels, name, seed, label_suffix="_mask")
    out = trained.root / "pred_folder"
    printed = run_cli("predict", "--checkpoint", trained.checkpoint, scans, "--labels", labels, "--out", out,
                      "--probabilities", capsys=capsys)  # fmt: skip
    reports = [json.loads(line) for line in (out / "volumes.jsonl").read_text().splitlines()]
    assert [Path(r["volume"]).name for r in reports] == ["a.nii.gz", "b.nii.gz"]
    for name, report in zip("ab", reports, strict=True):
        predicted = check_on_grid(out / f"{name}_pred.nii.gz", scans / f"{name}.nii.gz")
        assert report["dice"] >= DICE_THRESHOLD, f"{name}: Dice {report['dice']:.3f}"
        assert f"{name}.nii.gz: Dice" in printed
        probability = nib.load(out / f"{name}_prob.nii.gz")
        np.testing.assert_array_equal(probability.affine, nib.load(scans / f"{name}.nii.gz").affine)
        values = np.asanyarray(probability.dataobj)
        assert (
            values.dtype == np.float32 and values.shape == SHAPE and 0 <= values.min() and values.max() <= 1
        )
        # Binary argmax: the label is 1 exactly where the head probability wins.
        np.testing.assert_array_equal(predicted[values > 0.5 + 1e-4], 1)
        np.testing.assert_array_equal(predicted[values < 0.5 - 1e-4], 0)


def _bad_inputs(folder: Path, trained: Trained) -> dict[str, tuple[list[object], str]]:
    """name → (predict arguments after the checkpoint, a regex the one error line must match)."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8, 3), np.float32), affine), folder / "series4d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), folder / "flat2d.nii.gz")
    (folder / "notes.nii.gz").write_text("this is not a NIfTI file\n")
    nan = np.asanyarray(nib.load(trained.heldout).dataobj).astype(np.float32)
    nan[10, 10, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), folder / "nan.nii.gz")
    small_label = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 4), np.uint8)
    nib.save(nib.Nifti1Image(small_label, affine), folder / "short_label.nii.gz")
    return {
        "4D volume": ([folder / "series4d.nii.gz"], r"series4d\.nii\.gz: 3 channels, the model was trained on volumes with 1"),
        "2D volume": ([folder / "flat2d.nii.gz"], r"flat2d\.nii\.gz: expected a 3D volume \(or 4D with channels last\), got shape \(16, 16\)"),
        "text file": ([folder / "notes.nii.gz"], r"notes\.nii\.gz: not a readable NIfTI file"),
        "NaN voxel": ([folder / "nan.nii.gz"], r"nan\.nii\.gz: contains 1 NaN/Inf voxels"),
        "label shape": ([trained.heldout, "--labels", folder / "short_label.nii.gz"],
                        r"short_label\.nii\.gz has shape \(48, 48, 20\).*\(48, 48, 24\)"),
    }  # fmt: skip


@pytest.mark.slow
def test_bad_volumes_give_one_error_line(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    folder = trained.root / "bad"
    for name, (arguments, pattern) in _bad_inputs(folder, trained).items():
        out = folder / f"out_{name.replace(' ', '_')}"
        line = error_of(["predict", "--checkpoint", trained.checkpoint, *arguments, "--out", out], capsys)
        assert len(line) < 400, f"{name}: error line too long: {line}"
        assert re.search(pattern, line), f"{name}: {line!r} does not match {pattern!r}"


def test_prepare_volumes_process_exit_code(tmp_path: Path) -> None:
    """The real entry point (`python -m dinov3ds`): a text file named .nii.gz and a mismatched label, exit 2,
    stderr exactly one line."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_pair(images, labels, "good", 0)
    (images / "broken.nii.gz").write_text("not a volume")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), labels / "broken_seg.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(out: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "dinov3ds", "prepare-volumes", "--images", str(images), "--labels",
                   str(labels), "--out", str(tmp_path / out), "--val-fraction", "0"]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    result = run("out1")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert (
        result.stderr.startswith("dinov3ds: error: ")
        and "broken.nii.gz: not a readable NIfTI file" in result.stderr
    )

    (images / "broken.nii.gz").unlink()
    image, _ = make_head_phantom((20, 20, 10), seed=1)
    nib.save(image, images / "broken.nii.gz")  # a real volume now, but its label is 4 x 4 x 4
    result = run("out2")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "has shape (20, 20, 10) but its label" in result.stderr and "(4, 4, 4)" in result.stderr
