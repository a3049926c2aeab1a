"""Head-only checkpoint files: atomic writes, safe reads, format and task checks, finding the backbone again.

The files are written here by hand in the layout Lightning and dinov3ds produce, so each check is tried
on exactly the defect it is for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import (
    FORMAT_VERSION,
    atomic_torch_save,
    load_checkpoint_file,
    read_checkpoint,
    resolve_backbone_weights,
)
from dinov3ds.training.checkpoint_io import AtomicCheckpointIO
from tests.checkpoints import sha256_file


def raw_checkpoint(task: str = "segmentation", version: int = FORMAT_VERSION, weights: str = "random",
                   sha256: str = "") -> dict:  # fmt: skip
    return {
        "state_dict": {
            "model.head.classifier.weight": torch.full((2, 4, 1, 1), 0.5),
            "model.head.classifier.bias": torch.tensor([1.0, -1.0]),
            "model.backbone.blocks.0.norm1.weight": torch.ones(4),
            "other.buffer": torch.zeros(1),
        },
        "dinov3ds": {
            "task": task,
            "config": {"task": task},
            "class_names": ["sky", "road"],
            "num_classes": 2,
            "backbone": {"name": "vits16", "weights": weights, "sha256": sha256},
            "format_version": version,
        },
    }


def write(tmp_path: Path, checkpoint, name: str = "head.ckpt") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_read_checkpoint_splits_head_and_fine_tuned_backbone_weights(tmp_path):
    checkpoint = read_checkpoint(write(tmp_path, raw_checkpoint()), expected_task="segmentation")
    assert checkpoint.task == "segmentation" and checkpoint.num_classes == 2
    assert checkpoint.class_names == ["sky", "road"] and checkpoint.format_version == FORMAT_VERSION
    assert checkpoint.config == checkpoint.run_config == {"task": "segmentation"}  # no grid: one config
    assert checkpoint.backbone == {"name": "vits16", "weights": "random", "sha256": ""}
    assert set(checkpoint.head_state_dict) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(checkpoint.head_state_dict["classifier.bias"], torch.tensor([1.0, -1.0]))
    assert set(checkpoint.backbone_state_dict) == {"blocks.0.norm1.weight"}


def test_a_probe_grids_checkpoint_keeps_the_runs_own_config_apart(tmp_path):
    raw = raw_checkpoint("classification")
    raw["dinov3ds"]["run_config"] = {"task": "classification", "optim": {"lr_grid": [0.1, 0.01]}}
    checkpoint = read_checkpoint(write(tmp_path, raw))
    assert checkpoint.config == {"task": "classification"}  # the winner's, what rebuilds the head
    assert checkpoint.run_config["optim"]["lr_grid"] == [0.1, 0.01]  # what --resume compares


def test_expected_task_mismatch_names_both_tasks(tmp_path):
    path = write(tmp_path, raw_checkpoint(task="classification"))
    assert read_checkpoint(path).task == "classification"  # no expectation: any task
    with pytest.raises(UserError, match=r"is a classification checkpoint, not segmentation") as error:
        read_checkpoint(path, expected_task="segmentation")
    assert str(path) in str(error.value)


def test_newer_format_is_refused_and_current_accepted(tmp_path):
    assert read_checkpoint(write(tmp_path, raw_checkpoint(version=FORMAT_VERSION))).format_version == FORMAT_VERSION
    with pytest.raises(UserError, match=f"format {FORMAT_VERSION + 1}, newer.*upgrade"):
        read_checkpoint(write(tmp_path, raw_checkpoint(version=FORMAT_VERSION + 1)))


@pytest.mark.parametrize("content", [{"state_dict": {}}, [torch.zeros(1)], {"dinov3ds": "text"}])
def test_file_without_a_dinov3ds_section_is_refused(tmp_path, content):
    with pytest.raises(UserError, match="not a dinov3ds checkpoint"):
        read_checkpoint(write(tmp_path, content))


def test_missing_truncated_and_pickled_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint_file(tmp_path / "absent.ckpt")
    good = write(tmp_path, raw_checkpoint())
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read checkpoint.*truncated") as error:
        load_checkpoint_file(truncated)
    assert "\n" not in str(error.value)

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"dinov3ds": {}, "x": Payload()}, evil)
    with pytest.raises(UserError, match="refused to load.*Python objects"):
        load_checkpoint_file(evil)


def test_atomic_save_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)  # creates the folder
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def test_atomic_save_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    def failing_save(obj, handle):
        handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        atomic_torch_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_checkpoint_io_reports_a_full_disk_as_a_user_error(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(raw_checkpoint(), path)
    assert io.load_checkpoint(path)["dinov3ds"]["task"] == "segmentation"

    def full_disk(obj, handle):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last\.ckpt: No space left on device.*intact"):
        io.save_checkpoint(raw_checkpoint(), path)


def test_backbone_weights_are_found_by_hash_and_a_different_file_refused(tmp_path, monkeypatch):
    weights = tmp_path / "weights" / "dinov3_vits16_pretrain_lvd1689m-12345678.pth"
    weights.parent.mkdir()
    torch.save({"w": torch.ones(3)}, weights)
    digest = sha256_file(weights)
    checkpoint = read_checkpoint(write(tmp_path, raw_checkpoint(weights=weights.name, sha256=digest)))
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(weights.parent))
    assert resolve_backbone_weights(checkpoint, "head.ckpt", None) == str(weights)  # from checkpoints/
    assert resolve_backbone_weights(checkpoint, "head.ckpt", str(weights)) == str(weights)  # the recorded path

    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(UserError, match=r"trained on backbone weights .*-12345678\.pth .*other\.pth has sha256"):
        resolve_backbone_weights(checkpoint, "head.ckpt", str(other))

    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"head\.ckpt needs backbone weights .*-12345678\.pth; put that file"):
        resolve_backbone_weights(checkpoint, "head.ckpt", str(tmp_path / "missing.pth"))


def test_random_backbone_needs_no_file(tmp_path):
    checkpoint = read_checkpoint(write(tmp_path, raw_checkpoint(weights="random")))
    assert resolve_backbone_weights(checkpoint, "head.ckpt", "/nowhere.pth") == "random"


def test_atomic_save_creates_nested_folders_and_writes_beside_the_target(tmp_path, monkeypatch):
    """The temporary lies in the target's own folder (a rename across file systems is not atomic), hidden and
    named after the target, so a crash leaves nothing that looks like a checkpoint."""
    path = tmp_path / "a" / "b" / "last.ckpt"
    seen = []
    real_save = torch.save

    def watching_save(obj, handle):
        seen.extend(p.name for p in path.parent.iterdir())
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", watching_save)
    atomic_torch_save({"a": torch.ones(1)}, path)
    assert len(seen) == 1 and seen[0].startswith(".last.ckpt.") and seen[0].endswith(".tmp")
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_without_a_format_version_is_version_0(tmp_path):
    raw = raw_checkpoint()
    del raw["dinov3ds"]["format_version"]
    assert read_checkpoint(write(tmp_path, raw)).format_version == 0


def test_recorded_random_weights_never_name_a_file(tmp_path, monkeypatch):
    """backbone.weights=random on a head trained on real weights: a file called `random` is not a candidate."""
    weights = tmp_path / "weights" / "dinov3_vits16_pretrain_lvd1689m-12345678.pth"
    weights.parent.mkdir()
    torch.save({"w": torch.ones(3)}, weights)
    checkpoint = read_checkpoint(write(tmp_path, raw_checkpoint(weights=weights.name, sha256=sha256_file(weights))))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").write_bytes(b"not the weights")
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(weights.parent))
    assert resolve_backbone_weights(checkpoint, "head.ckpt", "random") == str(weights)
