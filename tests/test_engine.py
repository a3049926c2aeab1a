"""Engine pieces that end-to-end tests do not pin down: schedule, config errors, lr grid, atomic writes."""

from __future__ import annotations

import csv

import pytest
import torch

from dinov3ds.config import load_config
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import atomic_torch_save, read_checkpoint
from dinov3ds.models.tasks import Classifier, LinearClassificationHead, Segmenter
from dinov3ds.training.module import warmup_cosine
from dinov3ds.training.trainer import train
from tests.conftest import tiny

TINY = tiny("data.augment=false")


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.0, True) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0, True) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0, True) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0, True) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1, True) == pytest.approx(0.1)
    assert warmup_cosine(70, 100, 0, 0.0, False) == 1.0


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'trainer.max_epoch'.*max_epochs"):
        load_config(None, ["trainer.max_epoch=3"])
    with pytest.raises(UserError, match=r"'data.batch_size'"):
        load_config(None, ["data.batch_size=lots"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert load_config(None, ["trainer.devices=[0,1]"]).trainer.devices == [0, 1]


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full in the middle of the write")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_learning_rate_grid_keeps_the_best_head(tmp_path):
    root = make_classification_folder(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=4, size=32)
    config = load_config(None, [*TINY, f"data.root={root}", "trainer.max_epochs=4", f"output_dir={tmp_path / 'run'}",
                                "optim.lr_grid=[0.00001,0.01,0.1]", "trainer.log_every_n_steps=1"])  # fmt: skip
    result = train(config)
    grid = {k: v for k, v in result.metrics.items() if k.startswith("val/top1_lr")}
    assert len(grid) == 3
    assert result.metrics["val/top1"] == pytest.approx(max(grid.values()))
    # The saved head is the best one: reloading it reproduces the best validation accuracy.
    classifier = Classifier.from_checkpoint(result.last_checkpoint)
    images = sorted((root / "val").rglob("*.JPEG"))
    predictions = classifier.predict(images, topk=1)
    accuracy = sum(p["labels"][0] == image.parent.name for p, image in zip(predictions, images)) / len(images)
    assert accuracy == pytest.approx(result.metrics["val/top1"], abs=1e-6)
    # A classification checkpoint is never silently built into a segmenter (its head would be garbage).
    with pytest.raises(UserError, match="is a classification checkpoint, not segmentation") as error:
        Segmenter.from_checkpoint(result.last_checkpoint)
    assert str(result.last_checkpoint) in str(error.value)
    with pytest.raises(UserError, match="classification checkpoint"):
        read_checkpoint(result.last_checkpoint, expected_task="segmentation")
    # train/loss is the mean of the heads' losses (comparable with one head's), each head's is logged too.
    with open(result.output_dir / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert rows
    for row in rows:
        heads = [float(row[f"train/loss_lr{lr:g}"]) for lr in (0.00001, 0.01, 0.1)]
        assert float(row["train/loss"]) == pytest.approx(sum(heads) / 3, rel=1e-5)


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2, size=32)
    common = [*TINY, f"data.root={root}", f"output_dir={tmp_path / 'run'}", "trainer.log_every_n_steps=1"]
    train(load_config(None, [*common, "trainer.max_epochs=1"]))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    good = read_checkpoint(last).head_state_dict
    # The fault: the head's output turns NaN (as a diverging run's does); config ranges refuse a NaN lr itself.
    original = LinearClassificationHead.forward
    monkeypatch.setattr(LinearClassificationHead, "forward", lambda self, x: original(self, x) * float("nan"))
    with pytest.raises(UserError, match="NaN/Inf"):
        train(load_config(None, [*common, "trainer.max_epochs=3"]), resume=True)
    kept = read_checkpoint(last).head_state_dict
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert all(torch.equal(good[k], kept[k]) for k in good)  # the failed run wrote nothing over it


@pytest.mark.parametrize("progress_bar", [True, False])
def test_training_reads_device_values_only_at_logging_intervals(tmp_path, monkeypatch, progress_bar):
    """Every Tensor -> Python read in Lightning or dinov3ds during training batches is a host-device sync on
    a GPU. Reads must happen once per logging interval (NaN check, shown loss, logger), not once per step."""
    import sys

    import lightning.pytorch as L

    import dinov3ds.training.trainer as engine

    state = {"in_batch": False, "steps": 0, "reads": 0}

    def counted(method):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if state["in_batch"] and ("lightning" in caller or "dinov3ds" in caller):
                state["reads"] += 1
            return method(self, *args, **kwargs)

        return read

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))

    class BatchWindow(L.Callback):
        def on_train_batch_start(self, *args):
            state["in_batch"] = True
            state["steps"] += 1

        def on_validation_start(self, *args):
            state["in_batch"] = False

    build_trainer = engine.build_trainer

    def with_window(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(BatchWindow())
        return trainer

    monkeypatch.setattr(engine, "build_trainer", with_window)
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=20, val_per_class=1, size=32)
    train(load_config(None, [*TINY, f"data.root={root}", "data.augment=true", "data.batch_size=2", "trainer.max_epochs=1",
                             "trainer.log_every_n_steps=10", f"trainer.progress_bar={progress_bar}",
                             f"output_dir={tmp_path / 'run'}"]))  # fmt: skip
    intervals = -(-state["steps"] // 10)
    assert state["steps"] == 30
    assert state["reads"] <= 3 * intervals, f"{state['reads']} device reads in {state['steps']} steps"
