"""Nothing a user gave or got is lost, and nothing printed misleads: what a new user hit on unfamiliar data
(issue "Nothing lost, nothing misleading"). Each test is one of the measured failures, turned around."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import build_parser, main
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from tests.conftest import tiny


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("dinov3ds: error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A tiny trained segmentation checkpoint and its data."""
    work = tmp_path_factory.mktemp("seg")
    root = make_segmentation_folder(work / "data", num_classes=3, train=4, val=2, size=(32, 32))
    run = work / "run"
    assert main(["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
                                "data.num_classes=3", "data.batch_size=2", "head.name=linear", "trainer.max_epochs=1"),
                 f"output_dir={run}"]) == 0  # fmt: skip
    return run / "checkpoints" / "best.ckpt", root


# 1 ------------------------------------------------------------------------------ predict never loses a file


def test_predict_into_the_input_folder_keeps_the_inputs(segmenter, tmp_path, capsys):
    checkpoint, _ = segmenter
    folder = tmp_path / "photos"
    folder.mkdir()
    picture = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(picture).save(folder / "pic.png")
    before = (folder / "pic.png").read_bytes()
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(folder)]) == 0
    assert (folder / "pic.png").read_bytes() == before
    assert (folder / "pic.png.labels.png").is_file() and (folder / "pic.png.overlay.png").is_file()


def test_same_names_in_other_folders_or_with_other_extensions_write_distinct_files(segmenter, tmp_path):
    checkpoint, _ = segmenter
    for relative in ("a/img.jpg", "b/img.png", "b/img.jpg"):
        (tmp_path / "in" / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "in" / relative)
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.labels.png"))
    assert written == ["a/img.jpg.labels.png", "b/img.jpg.labels.png", "b/img.png.labels.png"]


def test_an_earlier_prediction_is_kept_unless_overwrite(segmenter, tmp_path, capsys):
    checkpoint, root = segmenter
    image = next((root / "images" / "val").glob("*.png"))
    args = ["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    labels = tmp_path / "out" / f"{image.name}.labels.png"
    labels.write_bytes(b"kept")
    assert main(args) == 2
    assert "already exists; pass --overwrite to replace it" in error_line(capsys)
    assert labels.read_bytes() == b"kept"
    assert main([*args, "--overwrite"]) == 0 and labels.read_bytes() != b"kept"


# 2 ---------------------------------------------------------------------- train never replaces an earlier run


@pytest.fixture
def classification_data(tmp_path):
    return make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32)


def test_train_into_a_folder_holding_a_run_is_refused_then_overwritten_on_request(classification_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *tiny("trainer.max_epochs=1", f"data.root={classification_data}"), f"output_dir={run}"]
    assert main(args) == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "notes.txt").write_text("the user's own file")
    assert main(args) == 2
    assert "already holds a run" in error_line(capsys)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "the user's own file"  # --overwrite removes only the run's files


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(classification_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    args = ["train", *tiny("trainer.max_epochs=1", f"data.root={classification_data}"), f"output_dir={run}"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".dinov3ds.lock").write_text(f"{live.pid} {os.uname().nodename}\n")
        assert main(args) == 2
        assert f"is in use by another dinov3ds run (pid {live.pid})" in error_line(capsys)
    finally:
        live.kill()
        live.wait()
    assert main(args) == 0  # that process is gone: its lock is stale
    assert not (run / ".dinov3ds.lock").exists()


# 3 -------------------------------------------------------------- a corrupt last.ckpt is one line, with a way out


def test_resume_from_a_truncated_checkpoint_names_it_and_offers_the_newest_readable(classification_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *tiny("trainer.max_epochs=2", f"data.root={classification_data}"), f"output_dir={run}"]
    assert main(args) == 0
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:500])
    assert main([*args[:1], "--resume", *args[1:]]) == 2
    line = error_line(capsys)
    assert f"cannot read checkpoint {last}" in line and f"--resume-from {run / 'checkpoints' / 'best.ckpt'}" in line


def test_resume_with_a_setting_that_changes_the_head_is_refused(classification_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *tiny("trainer.max_epochs=1", f"data.root={classification_data}"), f"output_dir={run}"]
    assert main(args) == 0
    assert main(["train", "--resume", *args[1:], "head.pooling=cls", "trainer.max_epochs=2"]) == 2
    assert "--resume: head.pooling is 'cls' but the run in" in error_line(capsys)


# 11 13 ------------------------------------------------------------------------------------------ training


def test_unknown_imagenette_folders_are_named_once(tmp_path):
    from dinov3ds.data.classification import IMAGENETTE_CLASSES, ImageFolderDataset

    for wnid in ("n01440764", "n02102040", "n99999999"):  # tench, English springer, and one not in the table
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "train" / wnid / "x.JPEG")
    with pytest.warns(UserWarning, match=r"train: class folders n99999999 have no name in the built-in table") as seen:
        dataset = ImageFolderDataset(tmp_path, "train", lambda image: image, class_names=IMAGENETTE_CLASSES)
    assert len(seen) == 1 and dataset.class_names == ["tench", "English springer", "n99999999"]


def test_a_run_ending_before_its_first_validation_is_validated_at_the_end(classification_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(f"data.root={classification_data}", "data.batch_size=1", "trainer.max_steps=2",
                                "trainer.val_check_interval=50"), f"output_dir={run}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "best checkpoint: None" not in out and ", step 2): val/" in out
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "val_metrics.json").is_file()


# 15 16 17 ---------------------------------------------------------------------------------- tools


def test_export_writes_the_preprocessing_beside_and_inside_the_graph(segmenter, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    checkpoint, _ = segmenter
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--height", "32", "--width", "32"]) == 0
    assert "TracerWarning" not in capsys.readouterr().err
    assert not (tmp_path / "model.onnx.json").exists()  # the graph carries its own facts (issue 34)
    stored = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(stored["dinov3ds.mean"]) == [0.485, 0.456, 0.406] and json.loads(stored["dinov3ds.input_size"]) == [32, 32]
    assert json.loads(stored["dinov3ds.class_names"]) == ["class_0", "class_1", "class_2"]


def test_pca_keeps_the_aspect_ratio_and_rounds_the_size(tmp_path):
    Image.new("RGB", (90, 45), (120, 30, 200)).save(tmp_path / "wide.png")
    assert main(["pca", "--weights", "random", str(tmp_path / "wide.png"), "--image-size", "40",
                 "--out", str(tmp_path / "pca")]) == 0  # fmt: skip
    width, height = Image.open(tmp_path / "pca" / "wide_pca.png").size
    assert (height, width) == (48, 2 * 80)  # shorter side 40 → 48 (nearest multiple of 16), 80 → 80; image | PCA


def test_pca_out_named_as_a_picture_is_refused_before_a_folder_of_that_name_is_made(tmp_path, capsys):
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "photo.png")
    assert main(["pca", "--weights", "random", str(tmp_path / "photo.png"), "--out", str(tmp_path / "pca.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "give a folder, e.g. --out" in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "pca.png").exists()


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, command in commands.items()
               for action in command._actions
               if action.help is None and not isinstance(action, argparse._HelpAction)]  # fmt: skip
    assert missing == []


def test_prepare_volumes_takes_explicit_splits(tmp_path):
    import nibabel as nib

    from dinov3ds.data.synthetic import make_head_phantom

    for seed in range(4):
        image, label = make_head_phantom((12, 14, 6), seed=seed)
        (tmp_path / "scans").mkdir(exist_ok=True)
        nib.save(image, tmp_path / "scans" / f"case{seed}.nii.gz")
        nib.save(label, tmp_path / "scans" / f"case{seed}_seg.nii.gz")
    common = ["prepare-volumes", "--images", str(tmp_path / "scans"), "--labels", str(tmp_path / "scans")]
    assert main([*common, "--out", str(tmp_path / "a"), "--val", "case1.nii.gz,case3", "--test", "case0"]) == 0
    summary = json.loads((tmp_path / "a" / "volumes.json").read_text())
    assert summary["splits"] == {"train": ["case2"], "val": ["case1", "case3"], "test": ["case0"]}
    (tmp_path / "splits.csv").write_text("name,split\ncase2,val\ncase0,train\n")
    assert main([*common, "--out", str(tmp_path / "b"), "--splits", str(tmp_path / "splits.csv")]) == 0
    assert json.loads((tmp_path / "b" / "volumes.json").read_text())["splits"]["val"] == ["case2"]
    assert main([*common, "--out", str(tmp_path / "c"), "--val", "case9"]) == 2


def test_predict_prints_the_top_label_of_each_image(tmp_path, capsys):
    root = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=2, size=32)
    run = tmp_path / "run"
    assert main(["train", *tiny("trainer.max_epochs=1", f"data.root={root}"), f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), str(root / "val"),
                 "--out", str(tmp_path / "pred")]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if ".JPEG: " in line]  # path: label p, label p
    assert len(rows) == 4 and all(row.split(": ", 1)[1].count("class_") == 2 for row in rows)  # --topk 5 of 2 classes
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["dinov3ds"]["task"] == "classification"
