"""Resume is exact: a run that crashes mid-epoch and is resumed from its last checkpoint ends with the same
head, bit for bit, as a run that never stopped (augmentation, data order and workers included)."""

from __future__ import annotations

import csv

import pytest
import torch

from dinov3ds.config import load_config
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.training.module import TaskModule
from dinov3ds.training.trainer import train
from tests.conftest import tiny


class SimulatedCrash(RuntimeError):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Kill the run when it starts optimizer step `step` (after last.ckpt was written at an earlier step)."""
    original = TaskModule.training_step

    def training_step(self, batch, batch_index):
        if self.global_step == step:
            raise SimulatedCrash(f"crash at step {step}")
        return original(self, batch, batch_index)

    monkeypatch.setattr(TaskModule, "training_step", training_step)


def head_state(checkpoint) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items() if k.startswith("model.head.")}


def losses(folder) -> dict[int, str]:
    with open(folder / "metrics.csv", newline="") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")}


def assert_resume_is_exact(tmp_path, monkeypatch, overrides: list[str], crash_step: int) -> None:
    whole = train(load_config(None, [*overrides, f"output_dir={tmp_path / 'whole'}"]))
    broken = load_config(None, [*overrides, f"output_dir={tmp_path / 'broken'}"])
    with monkeypatch.context() as patch:
        crash_at(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            train(broken)
    resumed = train(broken, resume=True)
    for key, value in head_state(whole.last_checkpoint).items():
        assert torch.equal(value, head_state(resumed.last_checkpoint)[key]), key
    assert losses(tmp_path / "whole") == losses(tmp_path / "broken")  # every logged loss, before and after


@pytest.mark.parametrize("workers", [0, 2])
def test_segmentation_resume_mid_epoch_is_exact(tmp_path, monkeypatch, workers):
    root = make_segmentation_folder(tmp_path / "data", num_classes=3, train=12, val=2, size=(48, 48))
    overrides = [*tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
                       "data.num_classes=3", "data.batch_size=2", "data.augment=true", "data.photometric=true",
                       f"data.num_workers={workers}", "head.name=linear", "trainer.max_steps=14",
                       "trainer.val_check_interval=4", "trainer.log_every_n_steps=1")]  # fmt: skip
    # 6 steps an epoch, a checkpoint every 4 steps: the crash at step 10 resumes from step 8, mid-epoch 2.
    assert_resume_is_exact(tmp_path, monkeypatch, overrides, crash_step=10)


def test_classification_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2, size=32)
    overrides = [*tiny(f"data.root={root}", "data.batch_size=4", "data.augment=true", "trainer.max_steps=12",
                       "trainer.val_check_interval=3", "trainer.log_every_n_steps=1")]  # fmt: skip
    assert_resume_is_exact(tmp_path, monkeypatch, overrides, crash_step=8)
