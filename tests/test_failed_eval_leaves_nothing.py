"""A failed `dinov3ds eval` leaves the user's folders as it found them: the folders it created for `--out`
(parents included) are removed again when nothing was written, and folders that were there are untouched. A
`train` refused before its first checkpoint does the same with its output_dir."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_classification_folder
from tests.conftest import tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    data = make_classification_folder(work / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32)
    assert main(["train", *tiny("trainer.max_epochs=1", f"data.root={data}"), f"output_dir={work / 'run'}"]) == 0
    return work / "run" / "checkpoints" / "best.ckpt"


def tree(root: Path) -> dict[str, str]:
    """Every folder and file below `root` (files by their bytes' hash)."""
    return {str(path.relative_to(root)): "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}  # fmt: skip


@pytest.mark.parametrize("out", ["kept/new/deeper/eval", None], ids=["out-below-new-folders", "default-out"])
def test_eval_with_a_bad_data_root_fails_in_one_line_and_leaves_the_tree_as_it_was(checkpoint, tmp_path, out, capsys):
    home = tmp_path / "home"
    (home / "kept").mkdir(parents=True)
    (home / "kept" / "notes.txt").write_text("mine")
    (home / "no_images").mkdir()  # exists, so eval gets past its first check and fails on the data inside --out
    (home / "ckpt").mkdir()
    (home / "ckpt" / "best.ckpt").write_bytes(checkpoint.read_bytes())
    before = tree(home)
    argv = ["eval", "--checkpoint", str(home / "ckpt" / "best.ckpt"), f"data.root={home / 'no_images'}"]
    capsys.readouterr()
    assert main([*argv, *(["--out", str(home / out)] if out else [])]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dinov3ds: error: ") and "no_images" in err[0], err
    assert tree(home) == before


def test_a_successful_eval_keeps_the_folders_it_made(checkpoint, tmp_path):
    out = tmp_path / "new" / "deeper" / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert (out / "eval_metrics.json").is_file() and (out / "report.html").is_file()


def test_a_train_refused_before_its_first_checkpoint_takes_back_what_it_wrote(tmp_path, capsys):
    """Measured as a new user: `train` without weights failed in one line but left config.yaml, so the corrected
    command was refused ("already holds a run") until --overwrite. Now the folders it made go, and in a folder
    that was there only the user's own files stay."""
    data = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    home = tmp_path / "home"
    (home / "mine").mkdir(parents=True)
    (home / "mine" / "notes.txt").write_text("mine")
    before = tree(home)
    for out in (home / "new" / "run", home / "mine"):
        assert main(["train", *tiny(f"data.root={empty}"), f"output_dir={out}"]) == 2
        assert tree(home) == before
    assert "has no class subfolders" in capsys.readouterr().err
    assert main(["train", *tiny("trainer.max_epochs=1", f"data.root={data}"), f"output_dir={home / 'mine'}"]) == 0
    assert (home / "mine" / "notes.txt").read_text() == "mine" and (home / "mine" / "checkpoints" / "best.ckpt").is_file()
