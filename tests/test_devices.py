"""Inference on the device the user names, batched, and evaluation over several processes.

On this CPU-only machine: `--device cpu` and `auto` behave as before, a GPU that is not there is a one-line
error (exit 2), a two-process gloo `eval` gives exactly the one-process metrics, and batched prediction gives
the probabilities one-by-one prediction gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.commands.evaluate import evaluation_placement
from dinov3ds.commands.predict import classify_files, segment_files
from dinov3ds.config import load_config
from dinov3ds.data.image_batches import SameSizeBatches, header_size
from dinov3ds.data.io import load_image
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.errors import UserError
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.inference import labels_at_size
from dinov3ds.models.tasks import load_model
from tests.conftest import tiny

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU does")


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained 3-class segmentation checkpoint (unet_sum, 2 blocks) and its data."""
    work = tmp_path_factory.mktemp("seg")
    root = make_segmentation_folder(work / "data", num_classes=3, train=6, val=5, size=(48, 64))
    run = work / "run"
    assert main(["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
                                "data.num_classes=3", "data.batch_size=3", "head.name=unet_sum",
                                "head.options={base_channels: 16, image_channels: 4}", "trainer.max_epochs=1",
                                depth=2), f"output_dir={run}"]) == 0  # fmt: skip
    return run / "checkpoints" / "best.ckpt", root


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("cls")
    root = make_classification_folder(work / "data", num_classes=3, train_per_class=3, val_per_class=2, size=40)
    run = work / "run"
    assert main(["train", *tiny("trainer.max_epochs=1", f"data.root={root}"), f"output_dir={run}"]) == 0
    return run / "checkpoints" / "best.ckpt", root


# --- device names --------------------------------------------------------------------------------------------


@CPU_ONLY
def test_auto_and_cpu_mean_the_cpu_here() -> None:
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")


@CPU_ONLY
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_a_gpu_on_a_cpu_only_machine_is_refused(name) -> None:
    with pytest.raises(UserError, match="no CUDA GPU") as error:
        resolve_device(name)
    assert "\n" not in str(error.value) and "--device cpu" in str(error.value)


def test_a_gpu_index_past_the_last_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"1 GPU\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x", "mps"])
def test_unknown_device_names_list_the_choices(name) -> None:
    with pytest.raises(UserError, match="auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@CPU_ONLY
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_cli_refuses_a_missing_gpu_with_exit_code_2(command, segmentation_run, tmp_path, capsys) -> None:
    checkpoint, root = segmentation_run
    extra = {"eval": [], "predict": [str(root / "images" / "val")], "export": ["--out", str(tmp_path / "m.onnx")]}
    assert main([command, "--checkpoint", str(checkpoint), "--device", "cuda:3", *extra[command]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0], err
    assert not (tmp_path / "m.onnx").exists()


@CPU_ONLY
@pytest.mark.parametrize("command", ["features", "pca"])
def test_backbone_commands_refuse_a_missing_gpu(command, tmp_path, capsys) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    out = str(tmp_path / ("f.npz" if command == "features" else "pca"))
    assert main([command, str(image), "--out", out, "--weights", "random", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_evaluation_uses_one_device_unless_the_config_names_several(monkeypatch) -> None:
    config = load_config(None, [])  # trainer.devices: auto
    assert evaluation_placement(config, torch.device("cpu")) == ("cpu", 1, torch.device("cpu"))
    assert evaluation_placement(config, torch.device("cuda", 1)) == ("gpu", [1], torch.device("cuda", 1))
    two = load_config(None, ["trainer.devices=2"])
    assert evaluation_placement(two, torch.device("cpu"))[:2] == ("cpu", 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert evaluation_placement(two, torch.device("cuda", 0)) == ("gpu", 2, torch.device("cuda", 1))
    listed = load_config(None, ["trainer.devices=[2, 3]"])
    assert evaluation_placement(listed, torch.device("cuda", 0)) == ("gpu", [2, 3], torch.device("cuda", 3))


# --- evaluation through Lightning on two processes --------------------------------------------------------


def _eval_process(checkpoint: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dinov3ds", "eval", "--checkpoint", str(checkpoint), "--out", str(out),
               "--device", "cpu", *extra]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "eval_metrics.json").read_text())


def test_two_process_gloo_eval_gives_exactly_the_one_process_metrics(segmentation_run, tmp_path) -> None:
    """5 validation images over 2 ranks (3 + 2, nothing padded): intersections and unions are summed over the
    ranks before dividing, so every number equals the one-process run's."""
    checkpoint, _ = segmentation_run
    one = _eval_process(checkpoint, tmp_path / "one")
    two = _eval_process(checkpoint, tmp_path / "two", "trainer.devices=2", "trainer.strategy=ddp",
                        "trainer.accelerator=cpu")  # fmt: skip
    assert one.keys() == two.keys() and "mIoU" in one
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-12), key
    assert 0 < one["mIoU"] <= 1
    assert one["images"] == two["images"] == 5  # each image scored once over the two ranks


def test_eval_in_process_matches_the_metrics_of_the_loop_it_replaced(segmentation_run, tmp_path) -> None:
    """The Lightning evaluation scores the same label maps as predicting each image and counting by hand."""
    checkpoint, root = segmentation_run
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"), "--device", "auto"]) == 0
    reported = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    model = load_model(checkpoint, device="cpu")
    intersection, union = np.zeros(3), np.zeros(3)
    images = sorted((root / "images" / "val").glob("*.png"))
    for index, probabilities in segment_files(model, images):
        mask = np.asarray(Image.open(root / "annotations" / "val" / images[index].name)).astype(np.int64)
        labels = labels_at_size(probabilities[None], mask.shape)[0].numpy()
        for k in range(3):
            intersection[k] += ((labels == k) & (mask == k)).sum()
            union[k] += ((labels == k) | (mask == k)).sum()
    present = union > 0
    assert reported["mIoU"] == pytest.approx(float((intersection[present] / union[present]).mean()), abs=1e-9)


# --- batched prediction ---------------------------------------------------------------------------------------


@pytest.fixture
def mixed_sizes(tmp_path) -> list[Path]:
    """Seven images of three sizes (two with the same eval size), interleaved, in two folders."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(48, 64), (64, 48), (48, 64), (96, 128), (48, 64), (64, 48), (50, 66)]):
        path = tmp_path / "inputs" / ("a" if i % 2 else "b") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_batched_segmentation_gives_the_one_by_one_probabilities(segmentation_run, mixed_sizes) -> None:
    checkpoint, _ = segmentation_run
    single = load_model(checkpoint, device="cpu", overrides=["inference.batch_size=1"])
    batched = load_model(checkpoint, device="cpu", overrides=["inference.batch_size=4", "data.num_workers=2"])
    one = dict(segment_files(single, mixed_sizes))
    many = dict(segment_files(batched, mixed_sizes))
    assert sorted(one) == sorted(many) == list(range(len(mixed_sizes)))
    for index in one:
        assert one[index].shape == many[index].shape
        assert float((one[index] - many[index]).abs().max()) <= 1e-5, index


def test_batched_classification_gives_the_one_by_one_rows(classification_run, mixed_sizes) -> None:
    checkpoint, _ = classification_run
    single = load_model(checkpoint, device="cpu", overrides=["inference.batch_size=1"])
    batched = load_model(checkpoint, device="cpu", overrides=["inference.batch_size=8", "data.num_workers=2"])
    one, many = classify_files(single, mixed_sizes, 3), classify_files(batched, mixed_sizes, 3)
    assert [row["image"] for row in many] == [str(p) for p in mixed_sizes]
    for a, b in zip(one, many):
        assert a["labels"] == b["labels"]
        assert np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() <= 1e-5


def test_batched_cli_predict_writes_the_same_label_maps(segmentation_run, mixed_sizes, tmp_path) -> None:
    checkpoint, _ = segmentation_run
    folder = mixed_sizes[0].parent.parent
    outputs = {}
    for batch in (1, 4):
        out = tmp_path / f"pred{batch}"
        assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu",
                     f"inference.batch_size={batch}"]) == 0  # fmt: skip
        outputs[batch] = {p.relative_to(out): np.asarray(Image.open(p)) for p in out.rglob("*.labels.png")}
    assert len(outputs[1]) == len(mixed_sizes) and outputs[1].keys() == outputs[4].keys()
    for name, labels in outputs[1].items():
        assert np.array_equal(labels, outputs[4][name]), name
        assert labels.shape == np.asarray(load_image(folder / name.parent / name.name.removesuffix(".labels.png"))).shape[:2]


def test_same_size_batches_hold_one_size_each_in_input_order() -> None:
    sizes = [(2, 3), (3, 2), (2, 3), None, (2, 3), (3, 2), (2, 3)]
    batches = list(SameSizeBatches(sizes, batch_size=2))
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        assert len(batch) <= 2 and len({sizes[i] for i in batch}) == 1 and batch == sorted(batch)
    assert [3] in batches  # the unknown size goes alone
    assert batches == sorted(batches)


def test_header_size_follows_exif_rotation(tmp_path) -> None:
    image = Image.new("RGB", (40, 24), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    image.save(tmp_path / "plain.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    for name in ("rotated.jpg", "plain.jpg"):
        loaded = load_image(tmp_path / name)
        assert header_size(tmp_path / name) == (loaded.height, loaded.width)
    assert header_size(tmp_path / "rotated.jpg") == (40, 24)
    assert header_size(tmp_path / "broken.jpg") is None



@pytest.mark.parametrize(("accelerator", "devices", "gpus", "expected"), [
    ("cpu", 2, 0, 2), ("gpu", "0,1", 2, 2), ("gpu", [3], 4, 1), ("auto", -1, 4, 4), ("auto", "auto", 2, 2),
    ("auto", "auto", 0, 1), ("cpu", -1, 4, 1),
])  # fmt: skip
def test_process_count_as_lightning_starts_them(monkeypatch, accelerator, devices, gpus, expected):
    from dinov3ds.models import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert hardware.process_count(accelerator, devices) == expected


def test_batchnorm_syncs_whenever_several_processes_train(tmp_path):
    """`strategy: auto` with 2 devices is DDP as well: BatchNorm statistics must be synchronised there too."""
    from dinov3ds.training.trainer import build_trainer

    for devices, synced in ((1, False), (2, True)):
        config = load_config(None, ["trainer.accelerator=cpu", f"trainer.devices={devices}", "trainer.logger=[csv]"])
        trainer = build_trainer(config, tmp_path / str(devices), "val/top1")
        assert any(type(p).__name__ == "TorchSyncBatchNorm" for p in [trainer._accelerator_connector._layer_sync]
                   if p is not None) == synced  # fmt: skip
