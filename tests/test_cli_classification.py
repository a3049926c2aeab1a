"""End-to-end classification through the real command line (`python -m dinov3ds ...` in a subprocess).

Everything runs on CPU with a random-weight ViT-S/16 cut to 2 blocks, 64 px generated ImageNette-shaped
folders and no data-loading workers. Most of a short CLI run is importing torch, timm and Lightning, so
independent commands are started side by side (`run_cli_parallel`).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data.classification import IMAGENETTE_CLASSES
from dinov3ds.data.download import DATASETS
from dinov3ds.data.synthetic import make_classification_folder
from tests.cli_helpers import (
    CliResult,
    cli_env,
    error_line,
    finish,
    run_cli,
    run_cli_parallel,
    serve_folder,
    start_cli,
)

BACKBONE = {"name": "vits16", "weights": "random", "overrides": {"depth": 2}}
CLASS_NAMES = list(IMAGENETTE_CLASSES.values())  # folder (wnid) order = sorted order = index order
EPOCHS = 30


def _write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def _read_metrics_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _val_rows(path: Path) -> list[dict[str, float]]:
    """One row per validation: epoch and the val/* columns, as floats."""
    rows = []
    for row in _read_metrics_csv(path):
        if row.get("val/top1"):
            rows.append({k: float(v) for k, v in row.items() if v and (k.startswith("val/") or k in ("epoch", "step"))})
    return rows


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.width > 50 and image.height > 50


# --------------------------------------------------------------------------------------------------------------
# 1 + 5: train → eval → predict (CLI), and the Python API on the same checkpoint
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ClassificationRun:
    work: Path
    data: Path
    output: Path
    heldout: list[tuple[Path, str]]  # (image, true class name), generated with another seed
    single: tuple[Path, str]
    train: CliResult
    eval: CliResult
    eval_out: Path
    predict: CliResult
    predict_out: Path
    predict_single: CliResult
    train_seconds: float


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> ClassificationRun:
    """Train once (config file + command-line overrides), then eval and two predicts side by side."""
    work = tmp_path_factory.mktemp("cli_classification")
    env = cli_env(cache=work / "cache", checkpoints=work / "no_checkpoints")
    (work / "no_checkpoints").mkdir()
    data = make_classification_folder(
        work / "data", num_classes=10, train_per_class=12, val_per_class=6, size=64
    )
    heldout_root = make_classification_folder(work / "heldout", num_classes=10, train_per_class=0, val_per_class=3,
                                              size=64, seed=1)  # fmt: skip
    heldout = [
        (path, IMAGENETTE_CLASSES[path.parent.name])
        for path in sorted((heldout_root / "val").rglob("*.JPEG"))
    ]
    assert len(heldout) == 30
    output = work / "run"
    config = _write_config(
        work / "classification.yaml",
        task="classification",
        backbone=BACKBONE,
        data={"dataset": "imagenette", "root": str(data), "image_size": 64, "augment": False, "batch_size": 16,
              "num_workers": 0},
        optim={"lr": 0.01},
        trainer={"max_epochs": 5, "accelerator": "cpu", "progress_bar": False},
    )  # fmt: skip
    start = time.perf_counter()
    # max_epochs and output_dir come from the command line, overriding the file.
    train = run_cli(
        ["train", "--config", config, f"trainer.max_epochs={EPOCHS}", f"output_dir={output}"],
        cwd=work,
        env=env,
    )
    train_seconds = time.perf_counter() - start
    assert train.returncode == 0, train.describe()
    best = output / "checkpoints" / "best.ckpt"
    single = heldout[7]
    results = run_cli_parallel(
        {
            "eval": ["eval", "--checkpoint", best, "--out", work / "eval"],
            "predict": [
                "predict",
                "--checkpoint",
                best,
                heldout_root / "val",
                "--out",
                work / "predictions",
                "--topk",
                "3",
            ],
            "single": ["predict", "--checkpoint", best, single[0], "--out", work / "single", "--topk", "3"],
        },
        cwd=work,
        env=env,
    )
    return ClassificationRun(work, data, output, heldout, single, train, results["eval"], work / "eval",
                             results["predict"], work / "predictions", results["single"], train_seconds)  # fmt: skip


@pytest.mark.slow
def test_train_writes_the_run_folder_and_learns(classification_run: ClassificationRun) -> None:
    run = classification_run
    output = run.output
    best, last = output / "checkpoints" / "best.ckpt", output / "checkpoints" / "last.ckpt"
    assert f"best checkpoint: {best} (epoch " in run.train.stdout
    for name in ("config.yaml", "metrics.csv", "curves.png", "val_confusion_matrix.png", "val_metrics.json",
                 "val_per_class_accuracy.csv"):  # fmt: skip
        assert (output / name).is_file(), f"{name} missing from {sorted(p.name for p in output.iterdir())}"
    assert best.is_file() and last.is_file()
    # last.ckpt (what --resume continues from) is the final epoch even when top-1 stopped improving earlier
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == EPOCHS - 1
    assert _is_png(output / "curves.png") and _is_png(output / "val_confusion_matrix.png")

    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["backbone"]["overrides"] == {"depth": 2} and saved["backbone"]["weights"] == "random"
    assert saved["trainer"]["max_epochs"] == EPOCHS  # the command line beat the config file's 5
    assert saved["output_dir"] == str(output) and saved["data"]["augment"] is False

    val_rows = _val_rows(output / "metrics.csv")
    assert [int(row["epoch"]) for row in val_rows] == list(range(EPOCHS))
    metrics = json.loads((output / "val_metrics.json").read_text())
    assert metrics["top1"] >= 0.9, metrics
    assert metrics["top1"] == pytest.approx(val_rows[-1]["val/top1"], abs=1e-6)  # the last validation
    assert val_rows[-1]["val/top1"] > val_rows[0]["val/top1"]  # it learned during the run
    # The summary names the best validation (its epoch, step and metrics) and the last one, each for what it is.
    best_line, last_line = run.train.stdout.splitlines()[:2]
    best_row = max(val_rows, key=lambda row: row["val/top1"])  # the first epoch reaching the best top-1
    # metrics.csv numbers a validation by its last training batch; the summary by the steps done (as checkpoints)
    assert f"(epoch {int(best_row['epoch'])}, step {int(best_row['step']) + 1})" in best_line, best_line
    assert f"val/top1={best_row['val/top1']:.4f}" in best_line
    assert last_line.startswith(f"last checkpoint: {last}") and f"val/top1={metrics['top1']:.4f}" in last_line
    # The feature cache was used: a linear probe without augmentation never runs the backbone per epoch.
    assert "feature store written" in run.train.stderr
    assert len(list((run.work / "cache" / "features").glob("*/index.json"))) == 2


@pytest.mark.slow
def test_checkpoint_is_head_only_and_self_describing(classification_run: ClassificationRun) -> None:
    best = classification_run.output / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {"model.head.linear.weight", "model.head.linear.bias"}, keys
    assert not any(key.startswith("model.backbone.") for key in keys)
    feature_dim = 2 * 384  # cls + patch average of the last block
    assert checkpoint["state_dict"]["model.head.linear.weight"].shape == (10, feature_dim)
    # Two depth-2 ViT-S blocks alone are ~14 MB in float32; the head (+ AdamW state) is ~100 kB.
    assert best.stat().st_size < 1_000_000, best.stat().st_size
    meta = checkpoint["dinov3ds"]
    assert meta["task"] == "classification"
    assert meta["class_names"] == CLASS_NAMES and meta["num_classes"] == 10
    assert meta["backbone"]["name"] == "vits16"
    assert meta["backbone"]["weights"] == "random"
    assert meta["backbone"]["overrides"] == {"depth": 2}
    assert meta["config"]["backbone"] == {**meta["config"]["backbone"], **BACKBONE}
    assert meta["format_version"] >= 1 and meta["dinov3ds_version"]
    # best.ckpt is the epoch with the highest val/top1 (the first one, on ties)
    val_rows = _val_rows(classification_run.output / "metrics.csv")
    tops = [row["val/top1"] for row in val_rows]
    assert checkpoint["epoch"] == tops.index(max(tops))


@pytest.mark.slow
def test_eval_prints_and_writes_metrics(classification_run: ClassificationRun) -> None:
    run = classification_run
    assert run.eval.returncode == 0, run.eval.describe()
    metrics = json.loads((run.eval_out / "eval_metrics.json").read_text())
    assert metrics["top1"] >= 0.9 and metrics["top5"] >= metrics["top1"]
    printed = dict(re.findall(r"\b(top1|top5)=([0-9.]+)", run.eval.stdout))
    assert set(printed) == {"top1", "top5"}, run.eval.stdout
    assert float(printed["top1"]) == pytest.approx(100 * metrics["top1"], abs=0.006)
    assert float(printed["top5"]) == pytest.approx(100 * metrics["top5"], abs=0.006)
    # best.ckpt evaluated from images (no feature cache) agrees with its training-time validation, up to a
    # near-tie flipping under a different batch order.
    tops = [row["val/top1"] for row in _val_rows(run.output / "metrics.csv")]
    assert metrics["top1"] == pytest.approx(max(tops), abs=1 / 60 + 1e-6)

    with open(run.eval_out / "eval_per_class_accuracy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == CLASS_NAMES
    per_class = [float(row["accuracy"]) / 100 for row in rows]
    assert all(0 <= value <= 1 for value in per_class)
    assert sum(per_class) / len(per_class) == pytest.approx(metrics["top1"], abs=1e-3)  # 6 images per class
    for name in CLASS_NAMES:
        assert name in run.eval.stdout  # the per-class table
    assert _is_png(run.eval_out / "eval_confusion_matrix.png")


@pytest.mark.slow
def test_eval_needs_only_the_validation_split(classification_run: ClassificationRun, tmp_path: Path) -> None:
    """Evaluating on a machine that holds only the validation images: no training folder is read."""
    only_val = tmp_path / "data"
    shutil.copytree(classification_run.data / "val", only_val / "val")
    best = classification_run.output / "checkpoints" / "best.ckpt"
    code = main(["eval", "--checkpoint", str(best), "--out", str(tmp_path / "eval"), f"data.root={only_val}"])
    assert code == 0
    ours = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert ours["top1"] == json.loads((classification_run.eval_out / "eval_metrics.json").read_text())["top1"]


def _predictions(run: ClassificationRun) -> list[dict]:
    lines = (run.predict_out / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_predict_held_out_images(classification_run: ClassificationRun) -> None:
    run = classification_run
    assert run.predict.returncode == 0, run.predict.describe()
    rows = _predictions(run)
    truth = {str(path): name for path, name in run.heldout}
    assert sorted(row["image"] for row in rows) == sorted(truth)
    for row in rows:
        assert len(row["labels"]) == 3 and len(set(row["labels"])) == 3
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        assert [CLASS_NAMES[i] for i in row["indices"]] == row["labels"]
    correct = sum(row["labels"][0] == truth[row["image"]] for row in rows)
    assert correct / len(rows) >= 0.9, f"{correct}/{len(rows)} held-out images right"
    with open(run.predict_out / "predictions.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["label"] for r in table] == [r["labels"][0] for r in rows]


@pytest.mark.slow
def test_predict_single_image_prints_topk(classification_run: ClassificationRun) -> None:
    run = classification_run
    assert run.predict_single.returncode == 0, run.predict_single.describe()
    printed = re.findall(r"^\s*([01]\.\d{4})  (.+)$", run.predict_single.stdout, flags=re.MULTILINE)
    assert len(printed) == 3, run.predict_single.stdout
    probabilities = [float(p) for p, _ in printed]
    labels = [label for _, label in printed]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-3
    assert labels[0] == run.single[1]
    (row,) = [
        json.loads(line) for line in (run.work / "single" / "predictions.jsonl").read_text().splitlines()
    ]
    assert row["labels"] == labels
    assert row["probabilities"] == pytest.approx(probabilities, abs=6e-5)


@pytest.mark.slow
def test_python_api_matches_cli(classification_run: ClassificationRun) -> None:
    import dinov3ds

    run = classification_run
    classifier = dinov3ds.Classifier.from_checkpoint(run.output / "checkpoints" / "best.ckpt")
    assert classifier.class_names == CLASS_NAMES
    cli_rows = {row["image"]: row for row in _predictions(run)}
    images = [path for path, _ in run.heldout]
    results = classifier.predict(images, topk=3)
    assert len(results) == len(images)
    for path, result in zip(images, results):
        assert result["image"] == str(path)
        probabilities = result["probabilities"]
        assert len(result["labels"]) == 3 and all(0 <= p <= 1 for p in probabilities)
        assert sum(probabilities) <= 1 + 1e-6
        expected = cli_rows[str(path)]
        assert result["labels"] == expected["labels"]
        assert probabilities == pytest.approx(expected["probabilities"], abs=1e-5)
    # PIL images and arrays go through the same path as files.
    with Image.open(images[0]) as image:
        from_pil = classifier.predict(image.convert("RGB"), topk=3)[0]
    assert from_pil["labels"] == results[0]["labels"] and from_pil["image"] is None


# --------------------------------------------------------------------------------------------------------------
# 2: resume after SIGKILL gives the same result as an uninterrupted run
# --------------------------------------------------------------------------------------------------------------

RESUME_EPOCHS = 5
KILL_AT_EPOCH = 1


def _checkpoint_epoch(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:  # written by rename, so never half a file; a failed read just means "try again"
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return None


@dataclass
class ResumeRun:
    straight_dir: Path
    resumed_dir: Path
    killed_at_epoch: int
    straight: CliResult
    resumed: CliResult


@pytest.fixture(scope="module")
def resume_run(tmp_path_factory) -> ResumeRun:
    """Run A trains RESUME_EPOCHS epochs uninterrupted. Run B (same config, other output_dir) starts at the
    same time and is SIGKILLed as soon as its checkpoints/last.ckpt records epoch >= KILL_AT_EPOCH (polled
    every 20 ms; the file is written by atomic rename), then `train --resume` finishes it. Augmentation is on
    (random crops and flips drawn from the global RNGs, a fresh shuffle each epoch) and trainer.deterministic
    is set, so B matches A only if the optimizer, scheduler, loop counters *and* RNG states all come back.

    Too-late kill: the kill lands with RESUME_EPOCHS - KILL_AT_EPOCH - 1 = 3 whole epochs (each a backbone
    pass over 80 training and 20 validation images) still to run, hundreds of times the polling interval.
    The fixture asserts the kill really interrupted training (exit by SIGKILL, last.ckpt epoch < final epoch,
    no final report) rather than silently comparing two complete runs.
    """
    work = tmp_path_factory.mktemp("cli_resume")
    env = cli_env(cache=work / "cache", checkpoints=work / "no_checkpoints")
    data = make_classification_folder(
        work / "data", num_classes=5, train_per_class=16, val_per_class=4, size=64
    )
    common = [
        "backbone.name=vits16", "backbone.weights=random", "backbone.overrides={depth: 2}", "data.dataset=image_folder",
        f"data.root={data}", "data.image_size=64", "data.augment=true", "data.batch_size=16", "data.num_workers=0",
        "trainer.deterministic=true", f"trainer.max_epochs={RESUME_EPOCHS}", "trainer.accelerator=cpu",
        "trainer.progress_bar=false", "optim.lr=0.01", "optim.warmup_steps=3", "seed=7",
    ]  # fmt: skip
    straight_dir, resumed_dir = work / "straight", work / "resumed"
    straight = start_cli(["train", *common, f"output_dir={straight_dir}"], cwd=work, env=env)
    victim = start_cli(["train", *common, f"output_dir={resumed_dir}"], cwd=work, env=env)
    last = resumed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and victim.poll() is None:
        epoch = _checkpoint_epoch(last)
        if epoch is not None and epoch >= KILL_AT_EPOCH:
            victim.send_signal(signal.SIGKILL)
            killed_at = epoch
            break
        time.sleep(0.02)
    interrupted = finish(victim)
    straight_result = finish(straight)
    assert straight_result.returncode == 0, straight_result.describe()
    assert killed_at is not None, (
        f"run B ended before its epoch-{KILL_AT_EPOCH} checkpoint\n{interrupted.describe()}"
    )
    assert interrupted.returncode == -signal.SIGKILL, interrupted.describe()
    epoch_on_disk = _checkpoint_epoch(last)
    assert epoch_on_disk is not None and epoch_on_disk < RESUME_EPOCHS - 1, (
        f"the kill came after the last epoch (last.ckpt epoch {epoch_on_disk})"
    )
    assert not (resumed_dir / "val_metrics.json").exists()  # the killed run never reached its report

    resumed = run_cli(["train", "--resume", *common, f"output_dir={resumed_dir}"], cwd=work, env=env)
    assert resumed.returncode == 0, resumed.describe()
    return ResumeRun(straight_dir, resumed_dir, epoch_on_disk, straight_result, resumed)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(resume_run: ResumeRun) -> None:
    """Final validation metrics, every validation after the resume point and the final head are identical."""
    straight_dir, resumed_dir = resume_run.straight_dir, resume_run.resumed_dir
    expected = json.loads((straight_dir / "val_metrics.json").read_text())
    actual = json.loads((resumed_dir / "val_metrics.json").read_text())
    assert set(expected) >= {"top1", "top5"}
    assert actual == expected

    def checkpoint(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    a, b = (
        checkpoint(straight_dir / "checkpoints" / "last.ckpt"),
        checkpoint(resumed_dir / "checkpoints" / "last.ckpt"),
    )
    assert a["epoch"] == b["epoch"] == RESUME_EPOCHS - 1 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{key} differs after resume"
    # Every validation after the resume point is identical, loss included (the loss is far more sensitive
    # than top-1 on 20 images: a different shuffle or augmentation after the resume changes it).
    straight_rows = {int(r["epoch"]): r for r in _val_rows(straight_dir / "metrics.csv")}
    resumed_rows = {int(r["epoch"]): r for r in _val_rows(resumed_dir / "metrics.csv")}
    for epoch in range(resume_run.killed_at_epoch + 1, RESUME_EPOCHS):
        assert resumed_rows[epoch] == straight_rows[epoch], epoch


@pytest.mark.slow
def test_resume_keeps_the_metrics_history(resume_run: ResumeRun) -> None:
    """Lightning's CSVLogger starts a new metrics.csv on resume; the engine puts the earlier rows back."""
    epochs = [int(row["epoch"]) for row in _val_rows(resume_run.resumed_dir / "metrics.csv")]
    assert epochs == list(range(RESUME_EPOCHS))


# --------------------------------------------------------------------------------------------------------------
# 3: bad inputs → exit 2, one `dinov3ds: error:` line, no traceback, nothing executed
# --------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs `touch MARKER`: the file appears iff the loader executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class ErrorCases:
    work: Path
    results: dict[str, CliResult]
    markers: list[Path]


@pytest.fixture(scope="module")
def error_cases(tmp_path_factory) -> ErrorCases:
    work = tmp_path_factory.mktemp("cli_errors")
    env = cli_env(cache=work / "cache", checkpoints=work / "no_checkpoints")
    (work / "no_checkpoints").mkdir()
    data = make_classification_folder(
        work / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32
    )
    image = next((data / "val").rglob("*.JPEG"))
    base = ["train", *(f"backbone.{k}={v}" for k, v in BACKBONE.items() if k != "overrides"),
            "backbone.overrides={depth: 1}", f"data.root={data}", "data.image_size=32", "data.num_workers=0",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.progress_bar=false"]  # fmt: skip

    weights = work / "weights"
    try:
        from tests.checkpoints import write_official_checkpoint
    except ImportError:  # written by another engineer; the weight-file cases need it
        write_official_checkpoint = None
    commands: dict[str, list] = {
        "unknown_key": [*base, "trainer.max_epoch=3", f"output_dir={work / 'o1'}"],
        "wrong_type": [*base, "trainer.max_epochs=many", f"output_dir={work / 'o2'}"],
        "missing_root": [*base, f"data.root={work / 'nowhere'}", f"output_dir={work / 'o3'}"],
        "resume_without_last": ["train", "--resume", *base[1:], f"output_dir={work / 'fresh'}"],
    }
    if write_official_checkpoint is not None:
        official = write_official_checkpoint("vits16", weights, depth=1)
        truncated = weights / "vits16_truncated.pth"  # no hash in the name: the read itself must fail
        truncated.write_bytes(official.read_bytes()[: official.stat().st_size // 2])
        bad_hash = weights / re.sub(r"-[0-9a-f]{8}\.pth$", "-00000000.pth", official.name)
        shutil.copyfile(official, bad_hash)
        no_depth = [arg for arg in base if not arg.startswith("backbone.")]
        commands |= {
            "truncated_weights": [*no_depth, "backbone.name=vits16", f"backbone.weights={truncated}",
                                  "backbone.overrides={depth: 1}", f"output_dir={work / 'o4'}"],
            "wrong_hash_weights": [*no_depth, "backbone.name=vits16", f"backbone.weights={bad_hash}",
                                   "backbone.overrides={depth: 1}", f"output_dir={work / 'o5'}"],
            # a ViT-S file for a ViT-B: no architecture overrides, so the width check speaks
            "wrong_variant_weights": [*no_depth, "backbone.name=vitb16", f"backbone.weights={official}",
                                      f"output_dir={work / 'o6'}"],
        }  # fmt: skip

    foreign = work / "foreign.ckpt"
    torch.save({"state_dict": {"linear.weight": torch.zeros(2, 2)}, "epoch": 3}, foreign)
    markers = [work / "PWNED_torch", work / "PWNED_pickle"]
    evil_torch, evil_pickle = work / "evil.ckpt", work / "evil_raw.ckpt"
    torch.save({"state_dict": {}, "dinov3ds": _Payload(markers[0])}, evil_torch)  # zip format
    evil_pickle.write_bytes(pickle.dumps(_Payload(markers[1])))  # legacy raw pickle
    commands |= {
        "foreign_checkpoint_eval": ["eval", "--checkpoint", foreign],
        "malicious_checkpoint": ["predict", "--checkpoint", evil_torch, image, "--out", work / "p2"],
    }
    results = run_cli_parallel(commands, cwd=work, env=env, max_parallel=3)
    return ErrorCases(work, results, markers)


def _case(cases: ErrorCases, name: str) -> str:
    if name not in cases.results:
        pytest.skip("tests/checkpoints.py:write_official_checkpoint is not available")
    return error_line(cases.results[name])


def test_unknown_config_key_names_it_and_lists_allowed(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "unknown_key")
    assert "unknown key 'trainer.max_epoch'" in line
    assert "max_epochs" in line.split("allowed", 1)[1] and "deterministic" in line
    assert error_cases.results["unknown_key"].stderr.strip() == line  # nothing else was printed
    assert not (error_cases.work / "o1").exists()  # rejected before the run folder was made


def test_wrong_type_names_key_and_value(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "wrong_type")
    assert "trainer.max_epochs" in line and "'many'" in line
    assert error_cases.results["wrong_type"].stderr.strip() == line


def test_missing_data_root(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "missing_root")
    assert str(error_cases.work / "nowhere") in line and "does not exist" in line


def test_truncated_weight_file(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "truncated_weights")
    assert "vits16_truncated.pth" in line and "truncated" in line


def test_weight_file_with_wrong_hash_suffix(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "wrong_hash_weights")
    assert "-00000000.pth" in line and "00000000" in line and "SHA-256" in line


def test_weight_file_of_another_variant(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "wrong_variant_weights")
    assert "vitb16" in line and "width 384" in line and "768" in line


def test_resume_without_last_checkpoint(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "resume_without_last")
    assert "--resume" in line and str(error_cases.work / "fresh" / "checkpoints" / "last.ckpt") in line
    assert error_cases.results["resume_without_last"].stderr.strip() == line


def test_checkpoint_that_is_not_dinov3ds(error_cases: ErrorCases) -> None:
    line = _case(error_cases, "foreign_checkpoint_eval")
    assert "foreign.ckpt" in line and "not a dinov3ds checkpoint" in line


def test_malicious_pickle_is_refused_not_run(error_cases: ErrorCases) -> None:
    from dinov3ds.errors import UserError
    from dinov3ds.models.checkpoints import load_checkpoint_file

    line = _case(error_cases, "malicious_checkpoint")
    assert "refused to load" in line and "evil.ckpt" in line
    # The same loader on a legacy (non-zip) pickle, in this process: refused too, payload not run.
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint_file(error_cases.work / "evil_raw.ckpt")
    for marker in error_cases.markers:
        assert not marker.exists(), f"the pickle payload ran: {marker} was created"
    # The payload is real: a plain unpickle does run it (in a child, so this process stays clean).
    probe = error_cases.work / "PROBE"
    command = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", command], input=pickle.dumps(_Payload(probe)), check=True)
    assert probe.exists()


# --------------------------------------------------------------------------------------------------------------
# 4: download verifies the registry's MD5, also from a mirror URL
# --------------------------------------------------------------------------------------------------------------


def test_download_from_mirror_with_wrong_md5_is_refused(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    payload = tmp_path / "payload" / "imagenette2-160" / "train" / "n01440764"
    payload.mkdir(parents=True)
    (payload / "a.JPEG").write_bytes(b"not really a jpeg")
    with tarfile.open(served / "archive.tgz", "w:gz") as tar:
        tar.add(tmp_path / "payload" / "imagenette2-160", arcname="imagenette2-160")
    root = tmp_path / "datasets"
    expected_md5 = DATASETS["imagenette2-160"].md5
    with serve_folder(served) as url:
        result = run_cli(
            ["download", "imagenette2-160", "--root", root, "--url", f"{url}/archive.tgz"], cwd=tmp_path
        )
    line = error_line(result)
    assert "MD5" in line and expected_md5 in line and "archive.tgz" in line
    # Nothing unverified is left under a usable name, and nothing was extracted.
    leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert leftovers == [], leftovers
