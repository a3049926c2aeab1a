"""Issue 31, round 3, items 1, 2, 3, 17 and 37a: one writer per output folder, never a write through a
symbolic link, never a FIFO opened as an input, and an input named `-x.png` passed or named with the fix.

Rows run through the real CLI as the hostile-inputs corpus does (exit 2, one line, nothing outside the output
folder changed); what must succeed instead is a small test of its own, named with the item number.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov3ds.cli import main
from dinov3ds.commands.output_files import STAGE_PREFIX, OutputFolder, staged
from dinov3ds.data.synthetic import make_nnunet_dataset
from dinov3ds.errors import UserError
from tests import test_hostile_inputs as corpus
from tests.conftest import tiny
from tests.test_hostile_inputs import Workspace, evaluate, predict, save_image

trained, workspace, offline = corpus.trained, corpus.workspace, corpus.offline  # the corpus's fixtures, registered here

NNUNET = ["task=segmentation", "data.dataset=nnunet", "data.image_size=32", "data.batch_size=8", "data.val_fraction=0.5",
          "trainer.max_epochs=1"]  # fmt: skip


@pytest.fixture(scope="module")
def medical(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny nnU-Net dataset (2 training cases, 1 test case of 16 x 16 x 4) and a checkpoint trained on it."""
    work = tmp_path_factory.mktemp("nnunet")
    root = make_nnunet_dataset(work / "Dataset001_Tiny", training=2, test=1, shape=(16, 16, 4))
    assert main(["train", *tiny(*NNUNET, f"data.root={root}"), f"output_dir={work / 'run'}"]) == 0
    return root, work / "run" / "checkpoints" / "last.ckpt"


def locked_by_a_live_process(w: Workspace) -> Path:
    """OUT/.dinov3ds.lock naming this test's parent process: alive on this machine for the whole test."""
    (w.root / "out").mkdir(exist_ok=True)
    (w.root / "out" / ".dinov3ds.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")
    return w.root / "out"


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def victim(w: Workspace) -> Path:
    """A file outside OUT that a write through a link would change (the tree hash covers it)."""
    path = w.root / "victim.csv"
    path.write_text("the user's own table\n")
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), path)
    return path


def r3_01(w: Workspace) -> list[str]:
    locked_by_a_live_process(w)
    return predict(w, w.segmentation_checkpoint, save_image(w.root / "a.png", (32, 32)))


def r3_02(w: Workspace) -> list[str]:
    link(w.root / "out" / "predictions.csv", victim(w))
    return predict(w, w.classification_checkpoint, w.classification_data / "val", "--overwrite")


def r3_03_dangling(w: Workspace) -> list[str]:
    link(w.root / "out" / "a.png.labels.png", w.root / "escaped.png")
    return predict(w, w.segmentation_checkpoint, save_image(w.root / "a.png", (32, 32)))


def r3_03_folder(w: Workspace) -> list[str]:
    (w.root / "in" / "sub").mkdir(parents=True)
    save_image(w.root / "in" / "top.png", (32, 32))
    save_image(w.root / "in" / "sub" / "b.png", (32, 32))
    (w.root / "elsewhere").mkdir()
    link(w.root / "out" / "sub", w.root / "elsewhere")
    return predict(w, w.segmentation_checkpoint, w.root / "in")


def r3_17_folder(w: Workspace) -> list[str]:
    fifo(w.root / "in" / "x.png")
    save_image(w.root / "in" / "a.png", (32, 32))
    return predict(w, w.segmentation_checkpoint, w.root / "in")


def r3_37(w: Workspace) -> list[str]:
    save_image(w.root / "-a.png", (32, 32))
    return ["predict", "--checkpoint", str(w.segmentation_checkpoint), "-a.png", "--out", str(w.root / "out")]


IN_USE = r"--out \S*out is in use by another dinov3ds run \(pid \d+\); wait for it to finish or choose another --out"
LINK = r"is a symbolic link; dinov3ds writes only inside \S*out, never through a link: remove the link or choose another --out"
ROWS: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    ("r3-01-predict-images-out-in-use", r3_01, IN_USE),
    ("r3-01-predict-volumes-out-in-use", lambda w: predict(w, w.segmentation_checkpoint, volume(w.root / "v.nii.gz"))
     if locked_by_a_live_process(w) else [], IN_USE),
    ("r3-01-eval-out-in-use", lambda w: evaluate(w, w.classification_checkpoint) if locked_by_a_live_process(w) else [], IN_USE),
    ("r3-02-overwrite-csv-symlinked-outside", r3_02, r"out/predictions\.csv " + LINK),
    ("r3-03-label-png-dangling-symlink", r3_03_dangling, r"out/a\.png\.labels\.png " + LINK),
    ("r3-03-symlinked-subfolder-in-out", r3_03_folder, r"out/sub " + LINK),
    ("r3-03-eval-metrics-dangling-symlink", lambda w: evaluate(w, w.classification_checkpoint)
     if link(w.root / "out" / "eval_metrics.json", w.root / "escaped.json") else [], r"out/eval_metrics\.json " + LINK),
    ("r3-17-fifo-image-input", lambda w: predict(w, w.segmentation_checkpoint, fifo(w.root / "x.png")),
     r"x\.png is a FIFO, not a regular file \(only those are opened"),
    ("r3-17-fifo-image-in-folder", r3_17_folder, r"in/x\.png is a FIFO, not a regular file"),
    ("r3-17-fifo-volume-input", lambda w: predict(w, w.segmentation_checkpoint, fifo(w.root / "v.nii.gz")),
     r"v\.nii\.gz is a FIFO, not a regular file"),
    ("r3-37-input-starting-with-dash", r3_37,
     r"^dinov3ds: error: -a\.png is a file whose name starts with '-', read as an option; put inputs after -- "
     r"\(\.\.\. -- -a\.png\) or write \./-a\.png$"),
]  # fmt: skip


@pytest.fixture
def deadline():
    """A FIFO opened by mistake blocks forever: fail the test after 60 s instead of hanging the suite."""

    def expire(signum, frame):
        raise TimeoutError("blocked for 60 s (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case, build, message", ROWS, ids=[row[0] for row in ROWS])
def test_r3_writers_refused_in_one_line(case, build, message, workspace, offline, deadline, monkeypatch, capsys):
    monkeypatch.chdir(workspace.root)  # the `-a.png` row names its input relative to here
    corpus.assert_refused(build(workspace), workspace.root, message, capsys)


# -- what is handled, not refused


def test_r3_01_a_dead_runs_lock_on_out_is_taken_over_with_a_warning(workspace, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = workspace.root / "out"
    out.mkdir()
    (out / ".dinov3ds.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(predict(workspace, workspace.segmentation_checkpoint, save_image(workspace.root / "a.png", (32, 32)))) == 0
    assert "taking over" in caplog.text and (out / "a.png.labels.png").is_file()
    assert not (out / ".dinov3ds.lock").exists()  # released when the run ends


def test_r3_01_a_second_run_is_refused_while_the_first_holds_out_and_admitted_after(tmp_path, capsys):
    folder = OutputFolder(tmp_path / "out")
    with folder.held("--out"):
        assert (tmp_path / "out" / ".dinov3ds.lock").read_text().split()[0] == str(os.getpid())
        second = OutputFolder(tmp_path / "out")
        with pytest.raises(UserError, match=rf"--out \S*out is in use by another dinov3ds run \(pid {os.getpid()}\)"):
            with second.held("--out"):
                pass
    with OutputFolder(tmp_path / "out").held("--out"):
        pass
    assert not (tmp_path / "out").exists()  # created by the run and left empty: removed again


def test_r3_02_overwrite_replaces_files_in_out_and_never_the_file_a_link_names(tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("kept")
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.csv").write_text("old")
    folder = OutputFolder(out, overwrite=True)
    with staged(folder.claim("table.csv")) as temporary:
        temporary.write_text("new")
    assert (out / "table.csv").read_text() == "new"
    (out / "linked.csv").symlink_to(outside)
    with pytest.raises(UserError, match=r"linked\.csv is a symbolic link"):
        folder.claim("linked.csv")
    with staged(out / "linked.csv") as temporary:  # even a path claimed before the link appeared: the link is
        temporary.write_text("new")  # replaced by the file, never written through
    assert outside.read_text() == "kept" and not (out / "linked.csv").is_symlink()
    assert not list(out.glob(STAGE_PREFIX + "*"))


def test_r3_03_a_write_that_fails_half_way_leaves_no_file_under_the_final_name(tmp_path):
    path = tmp_path / "result.png"
    with pytest.raises(RuntimeError):
        with staged(path) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not path.exists() and not list(tmp_path.glob(STAGE_PREFIX + "*"))


def test_r3_03_volume_outputs_refuse_a_dangling_link_and_are_regular_files(medical, tmp_path, capsys):
    root, checkpoint = medical
    case = sorted((root / "imagesTs").glob("*_0000.nii.gz"))[0].name.removesuffix("_0000.nii.gz")
    out = tmp_path / "out"
    link(out / f"{case}_pred.nii.gz", tmp_path / "escaped.nii.gz")
    args = ["predict", "--checkpoint", str(checkpoint), str(root / "imagesTs"), "--out", str(out)]
    assert main(args) == 2
    assert re.search(rf"{case}_pred\.nii\.gz " + LINK, capsys.readouterr().err)
    assert not (tmp_path / "escaped.nii.gz").exists()
    (out / f"{case}_pred.nii.gz").unlink()
    assert main([*args, "--probabilities"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"{case}_pred.nii.gz", f"{case}_prob.nii.gz", "volumes.jsonl"]
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())


def test_r3_03_eval_of_volumes_writes_its_reports_through_the_folder(medical, tmp_path, capsys):
    _, checkpoint = medical
    out = tmp_path / "eval"
    link(out / "eval_per_case.csv", tmp_path / "escaped.csv")
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main(args) == 2 and "eval_per_case.csv is a symbolic link" in capsys.readouterr().err
    (out / "eval_per_case.csv").unlink()
    assert main(args) == 0 and not (tmp_path / "escaped.csv").exists()
    assert sorted(p.name for p in out.iterdir()) == ["eval_info.json", "eval_metrics.json", "eval_per_case.csv",
                                                     "eval_slices.png", "report.html"]  # fmt: skip


def test_r3_37_an_input_starting_with_dash_is_predicted_after_double_dash(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    save_image(workspace.root / "-a.png", (32, 32))
    out = workspace.root / "out"
    assert main(["predict", "--checkpoint", str(workspace.segmentation_checkpoint), "--out", str(out), "--", "-a.png"]) == 0
    assert (out / "-a.png.labels.png").is_file() and (out / "-a.png.overlay.png").is_file()
