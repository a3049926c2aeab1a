"""Hostile inputs for depth (issue 36): depth files that cannot be right, an export with an unknown format, and
labels that do not cover the images, each through the real CLI as the hostile-inputs corpus does: exit 2, one
line naming the file and the fix, no file outside the output folder changed."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_depth_folder
from tests.conftest import tiny
from tests.test_hostile_inputs import MARKER, tree_hash


@dataclass
class DepthWorkspace:
    root: Path
    checkpoint: Path
    data: Path  # a depth_folder: {train,val}/{images,depth}


@pytest.fixture(scope="module")
def depth_trained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("depth_trained")
    data = make_depth_folder(base / "scenes", train=2, val=2)
    (base / "depth.yaml").write_text("task: depth\n")
    assert main(["train", "--config", str(base / "depth.yaml"), *tiny("data.dataset=depth_folder", f"data.root={data}",
                 "data.batch_size=2", "trainer.max_epochs=1", "trainer.logger=[csv]"), f"output_dir={base / 'run'}"]) == 0  # fmt: skip
    return base / "run" / "checkpoints" / "best.ckpt", data


@pytest.fixture
def depth_space(tmp_path, depth_trained) -> DepthWorkspace:
    """Copies inside this test's folder, so the tree hash covers them."""
    checkpoint, data = depth_trained
    (tmp_path / "ckpt").mkdir()
    shutil.copy(checkpoint, tmp_path / "ckpt" / "depth.ckpt")
    shutil.copytree(data, tmp_path / "scenes")
    (tmp_path / "depth.yaml").write_text("task: depth\n")
    return DepthWorkspace(tmp_path, tmp_path / "ckpt" / "depth.ckpt", tmp_path / "scenes")


def train_depth(w: DepthWorkspace) -> list[str]:
    return ["train", "--config", str(w.root / "depth.yaml"), *tiny("data.dataset=depth_folder", f"data.root={w.data}",
            "data.batch_size=2", "trainer.max_epochs=1", "trainer.logger=[csv]"), f"output_dir={w.root / 'out'}"]  # fmt: skip


def change(action: Callable[[DepthWorkspace], object]) -> Callable[[DepthWorkspace], list[str]]:
    """A row that edits the data, then trains on it."""
    return lambda w: (action(w), train_depth(w))[1]


def resized_depth(w: DepthWorkspace) -> None:
    Image.fromarray(np.full((8, 12), 2000, np.uint16)).save(w.data / "train" / "depth" / "001.png")


def eight_bit_depth(w: DepthWorkspace) -> None:
    Image.fromarray(np.full((32, 32), 20, np.uint8)).save(w.data / "val" / "depth" / "000.png")


def three_dim_npy(w: DepthWorkspace) -> None:
    (w.data / "train" / "depth" / "000.png").unlink()
    np.save(w.data / "train" / "depth" / "000.npy", np.ones((32, 32, 3), np.float32))


def labels_lacking_one(w: DepthWorkspace) -> list[str]:
    labels = w.root / "labels"
    shutil.copytree(w.data / "val" / "depth", labels)
    (labels / "001.png").unlink()
    return ["predict", "--checkpoint", str(w.checkpoint), str(w.data / "val" / "images"), "--out", str(w.root / "out"),
            "--labels", str(labels)]  # fmt: skip


def labels_of_another_size(w: DepthWorkspace) -> list[str]:
    labels = w.root / "labels"
    shutil.copytree(w.data / "val" / "depth", labels)
    Image.fromarray(np.full((16, 16), 2000, np.uint16)).save(labels / "001.png")
    return ["predict", "--checkpoint", str(w.checkpoint), str(w.data / "val" / "images"), "--out", str(w.root / "out"),
            "--labels", str(labels)]  # fmt: skip


# (case id, how to build the inputs and the command line, the error line must match)
CASES: list[tuple[str, Callable[[DepthWorkspace], list[str]], str]] = [
    ("d-depth-png-of-another-size", change(resized_depth),
     r"depth file \S+train/depth/001\.png is 12x8 but image \S+train/images/001\.png is 32x32; depth maps must match"),
    ("d-missing-depth-file", change(lambda w: (w.data / "val" / "depth" / "001.png").unlink()),
     r"image \S+val/images/001\.png has no depth file \S+val/depth/001\.png \(or \.npy\); add it or remove the image"),
    ("d-eight-bit-depth-png", change(eight_bit_depth), r"depth file \S+val/depth/000\.png is an L PNG, not 16-bit: .*save it as uint16"),
    ("d-npy-with-three-dims", change(three_dim_npy),
     r"depth file \S+train/depth/000\.npy holds float32 of shape \(32, 32, 3\); save one HxW array of metres"),
    ("d-export-unknown-format", lambda w: ["export", "--checkpoint", str(w.checkpoint), "--out", str(w.root / "out" / "d.x"),
                                           "--format", "tensorrt"], r"--format: invalid choice: 'tensorrt'"),
    ("d-predict-labels-lacking-a-depth-file", labels_lacking_one,
     r"--labels \S+labels: no depth file \S+labels/001\.png \(or \.npy\) for image \S+001\.png"),
    ("d-predict-labels-of-another-size", labels_of_another_size,
     r"--labels: depth file \S+labels/001\.png is 16x16 but image \S+001\.png is 32x32"),
]  # fmt: skip


@pytest.mark.parametrize("case, build, message", CASES, ids=[case[0] for case in CASES])
def test_bad_depth_input_is_one_line_exit_2_and_loses_nothing(case, build, message, depth_space, capsys):
    argv = build(depth_space)
    before = tree_hash(depth_space.root, depth_space.root / "out")
    capsys.readouterr()
    code = main([str(part) for part in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dinov3ds: error: ")]
    assert code == 2, f"exit {code}; stderr: {err[-800:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-800:]
    assert re.search(message, lines[0]), lines[0]
    assert tree_hash(depth_space.root, depth_space.root / "out") == before, "a file outside the output folder changed"
    assert not (depth_space.root / MARKER).exists()


def test_d_labels_of_another_size_are_refused_before_any_prediction(depth_space, capsys):
    """Every --labels file is checked against its image before the first depth PNG is written."""
    assert main(labels_of_another_size(depth_space)) == 2
    assert not list((depth_space.root / "out").rglob("*.png"))
