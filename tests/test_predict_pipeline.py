"""The predict pipeline of issue 38: JPEGs decoded at reduced DCT scale when the eval target is at least 2x
smaller, uint8 resizing before the float conversion, each image decoded once, workers from the usable cores;
outputs as the path it replaced gave them (full decode, torchvision Compose / PIL bilinear resize)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2

from dinov3ds.cli import main
from dinov3ds.commands import predict as command
from dinov3ds.commands.output_files import ParallelWriter
from dinov3ds.data import image_batches as image_batches_module
from dinov3ds.data.image_batches import SameSizeBatches, image_batches
from dinov3ds.data.io import decode_image, load_image
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.data.transforms import ClassificationEvalTransform, SegmentationEvalTransform
from dinov3ds.deploy.metadata import label_offset
from dinov3ds.errors import UserError
from dinov3ds.models.inference import labels_at_size
from dinov3ds.models.tasks import load_model
from tests.conftest import tiny

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(path: Path, width: int, height: int, orientation: int | None = None) -> Path:
    """A JPEG whose quadrants have different colours (so a wrong rotation shows), smooth enough for DCT scaling."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * (x < width / 2), 255 * (y < height / 2), 128 + 100 * np.sin(x / 9.0)], axis=-1)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95, exif=exif)
    return path


# --- decoding at reduced scale ---------------------------------------------------------------------------------


def test_draft_engages_only_when_the_target_is_at_least_twice_smaller(tmp_path) -> None:
    path = photo(tmp_path / "p.jpg", 256, 192)
    for target, decoded in [
        (lambda h, w: (h // 2, w // 2), (96, 128)),  # exactly 2x: half scale
        (lambda h, w: (h // 4, w // 4), (48, 64)),  # 4x: quarter scale
        (lambda h, w: (h // 5, w // 5), (48, 64)),  # 5x: quarter scale, never below the target (38x51)
        (lambda h, w: (h // 2 + 1, w // 2 + 1), (192, 256)),  # 1.98x: full size
        (lambda h, w: (h // 4, w // 2 + 1), (192, 256)),  # 2x on one side only: full size
        (None, (192, 256)),
    ]:
        image, size = decode_image(path, target)
        assert (image.height, image.width) == decoded and size == (192, 256)


def test_the_classification_eval_target_drafts_a_large_jpeg_but_not_a_small_one(tmp_path) -> None:
    transform = ClassificationEvalTransform(32, MEAN, STD)  # shorter side resized to 37 before the crop
    large, small = photo(tmp_path / "large.jpg", 160, 120), photo(tmp_path / "small.jpg", 96, 72)
    assert decode_image(large, transform.resize_size)[0].size == (80, 60)  # 120 / 37 = 3.2: half scale
    assert decode_image(small, transform.resize_size)[0].size == (96, 72)  # 72 / 37 = 1.9: full size


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_an_exif_rotated_jpeg_comes_out_upright_as_before(tmp_path, orientation) -> None:
    path = photo(tmp_path / "r.jpg", 256, 128, orientation)
    before = load_image(path)  # full decode, as the path this replaced
    image, size = decode_image(path, lambda h, w: (h // 4, w // 4))
    assert size == (before.height, before.width)
    assert image.size == (before.width // 4, before.height // 4)  # decoded at quarter scale, upright
    shrunk = np.asarray(before.resize(image.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(image, dtype=np.float64) - shrunk).mean() < 8  # the same picture, same way up
    turned = np.asarray(before.transpose(Image.Transpose.ROTATE_180).resize(image.size, Image.Resampling.BOX))
    assert np.abs(np.asarray(image, dtype=np.float64) - turned).mean() > 40  # (a wrong turn would show)


def test_a_png_is_decoded_whole_whatever_the_target(tmp_path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    image, size = decode_image(tmp_path / "p.png", lambda h, w: (h // 8, w // 8))
    assert size == (192, 256) and np.array_equal(np.asarray(image), pixels)


def test_the_classification_transform_is_the_compose_it_replaced_on_a_full_image(tmp_path) -> None:
    """Without a reduced decode, the uint8 pipeline gives torchvision's Compose bit for bit (shorter side
    size / crop_ratio, longer side truncated as torchvision does)."""
    rng = np.random.default_rng(1)
    for height, width in [(72, 96), (96, 72), (50, 133), (40, 40), (37, 61)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        old = v2.Compose([v2.ToImage(), v2.Resize(37, antialias=True), v2.CenterCrop(32),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])  # fmt: skip
        assert torch.equal(ClassificationEvalTransform(32, MEAN, STD)(image), old(image)), (height, width)


# --- the command against the path it replaced -------------------------------------------------------------------


@pytest.fixture(scope="module")
def classification(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny classifier trained on the demo's generated classes; held-out JPEGs large enough to be drafted."""
    work = tmp_path_factory.mktemp("cls")
    root = make_classification_folder(work / "data", num_classes=3, train_per_class=4, val_per_class=2, size=40)
    assert main(["train", *tiny("trainer.max_epochs=2", f"data.root={root}"), f"output_dir={work / 'run'}"]) == 0
    held = make_classification_folder(work / "held", num_classes=3, train_per_class=0, val_per_class=4, size=96, seed=3)
    return work / "run" / "checkpoints" / "best.ckpt", sorted((held / "val").rglob("*.JPEG"))


def test_classification_top1_is_unchanged_with_reduced_decoding(classification, tmp_path) -> None:
    checkpoint, photos = classification
    model = load_model(checkpoint, device="cpu")
    transform = model.eval_transform()
    assert all(decode_image(p, transform.resize_size)[0].size == (48, 48) for p in photos)  # 96 / 37: half scale
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, photos), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    old = v2.Compose([v2.ToImage(), v2.Resize(37, antialias=True), v2.CenterCrop(32),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(model.backbone.mean, model.backbone.std)])  # fmt: skip
    before = model.top_labels(torch.stack([old(load_image(p)) for p in photos]), 3)
    assert [row["image"] for row in rows] == [str(p) for p in photos]
    assert [row["labels"][0] for row in rows] == [row["labels"][0] for row in before]
    shift = max(abs(a["probabilities"][0] - b["probabilities"][0]) for a, b in zip(rows, before))
    print(f"top-1 equal on {len(rows)} images; largest top-1 probability shift {shift:.4f}")
    assert shift < 0.05


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_predict_imports_neither_lightning_nor_torchmetrics(task, request, tmp_path) -> None:
    """Start-up is most of a short predict: Lightning, torchmetrics and (through its text metrics) transformers
    took 2.6 s of a 5.5 s one-photo run on an AMX Xeon; a classification or segmentation predict needs none."""
    checkpoint, photos = request.getfixturevalue(task)
    code = ("import sys; from dinov3ds.cli import main; "
            f"assert main(['predict', '--checkpoint', {str(checkpoint)!r}, {str(photos[0])!r}, '--out', {str(tmp_path)!r}, "
            "'--device', 'cpu']) == 0; "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'transformers') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny segmenter trained on the demo's shapes; JPEG copies of its val images as the inputs."""
    work = tmp_path_factory.mktemp("seg")
    root = make_segmentation_folder(work / "data", num_classes=3, train=4, val=6, size=(96, 128))
    assert main(["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
                                "data.num_classes=3", "data.batch_size=2", "head.name=linear", "data.eval_size=48",
                                "trainer.max_epochs=1"), f"output_dir={work / 'run'}"]) == 0  # fmt: skip
    copies = work / "jpeg"
    copies.mkdir()
    for path in sorted((root / "images" / "val").glob("*.png")):
        Image.open(path).save(copies / f"{path.stem}.jpg", quality=95)
    return work / "run" / "checkpoints" / "best.ckpt", sorted(copies.glob("*.jpg"))


def test_segmentation_labels_match_the_path_they_replaced_and_each_image_is_decoded_once(segmentation, tmp_path,
                                                                                          monkeypatch) -> None:  # fmt: skip
    checkpoint, photos = segmentation
    decoded: list[str] = []
    original_load = ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # not yet decoded: this call decodes it
            decoded.append(Path(image.filename).name)
        return original_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, photos), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0  # fmt: skip
    monkeypatch.undo()
    assert sorted(decoded) == sorted(p.name for p in photos)  # once each (the overlay used to decode again)

    model = load_model(checkpoint, device="cpu")
    offset = label_offset(model.config)
    transform = SegmentationEvalTransform(48, model.backbone.mean, model.backbone.std, model.input_multiple)
    equal = total = 0
    for path in photos:
        picture = load_image(path)  # the old path: PIL's bilinear resize of the full decode
        height, width = transform.output_size(picture.height, picture.width)
        tensor = transform.normalize(v2.functional.to_image(picture.resize((width, height), Image.Resampling.BILINEAR)))
        with torch.inference_mode():
            probabilities = model.predict_probabilities(tensor.as_subclass(torch.Tensor)[None])
        before = labels_at_size(probabilities, (picture.height, picture.width))[0].numpy()
        written = np.asarray(Image.open(tmp_path / "out" / f"{path.name}.labels.png")).astype(np.int64) - offset
        assert (tmp_path / "out" / f"{path.name}.overlay.png").is_file()
        equal, total = equal + int((written == before).sum()), total + before.size
    print(f"segmentation labels equal to the old path: {equal / total:.4%} of {total} pixels")
    assert equal / total >= 0.99, equal / total


# --- batches and workers ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # built, never iterated: no process starts
def test_picture_batches_stay_under_their_byte_budget(tmp_path, monkeypatch) -> None:
    batches = list(SameSizeBatches([(2, 2)] * 5, batch_size=4, costs=[40, 40, 40, 200, 40], budget=100))
    assert batches == [[0, 1], [2], [3], [4]]  # an item over the budget goes alone
    paths = [photo(tmp_path / f"{i}.jpg", 64, 48) for i in range(8)]  # 9,216 bytes of picture each
    monkeypatch.setattr(image_batches_module, "PICTURE_BUDGET", 4 * 9216 * 4)  # 16 pictures in flight
    transform = SegmentationEvalTransform(32, MEAN, STD)
    for workers, per_batch in [(0, 8), (1, 8), (2, 4), (4, 2), (16, 1)]:  # each worker holds 2 batches
        loader = image_batches(paths, transform, 8, by_size=True, pictures=True, workers=workers)
        assert {len(batch) for batch in loader.batch_sampler} == {per_batch}, workers


def test_cpu_workers_take_only_the_cores_the_forward_leaves(classification, monkeypatch) -> None:
    model = load_model(classification[0], device="cpu")
    for cores, threads, cap, workers in [(2, 2, 4, 0), (16, 8, 4, 4), (16, 14, 4, 2), (64, 32, 8, 8), (8, 4, 0, 0),
                                         (4, 8, 4, 0)]:  # fmt: skip
        monkeypatch.setattr(command, "usable_cores", lambda cores=cores: cores)
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        model.config.data.num_workers = cap
        assert command._workers(model) == workers, (cores, threads, cap)


# --- output files written in parallel --------------------------------------------------------------------------


def test_output_writes_run_on_several_threads_at_once_and_all_finish() -> None:
    together = threading.Barrier(2, timeout=30)  # passes only when two writes run at the same time
    done: list[int] = []

    def write(index: int) -> None:
        if index < 2:
            together.wait()
        done.append(index)

    with ParallelWriter(threads=2) as writer:
        for index in range(8):
            writer.submit(1, write, index)
    assert sorted(done) == list(range(8))


def test_pending_output_writes_stay_under_their_byte_budget() -> None:
    lock, running, most = threading.Lock(), [0], [0]

    def write() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    with ParallelWriter(threads=4, budget=100) as writer:
        for _ in range(12):
            writer.submit(40, write)
    assert 1 <= most[0] <= 2  # 4 threads, but only two 40-byte writes fit in 100 bytes
    with ParallelWriter(threads=1, budget=10) as writer:
        writer.submit(40, write)  # a write over the budget still runs, alone


@pytest.mark.parametrize("writes", [4, 40])  # 4: raised when the block ends; 40: by a submit that waits for it
def test_a_failed_output_write_is_raised_in_the_caller(writes: int) -> None:
    started: list[int] = []

    def write(index: int) -> None:
        started.append(index)
        if index == 1:
            raise UserError("cannot write out/1.png (No space left on device); free disk space")

    with pytest.raises(UserError, match="No space left"), ParallelWriter(threads=2) as writer:
        for index in range(writes):
            writer.submit(1, write, index)
    assert len(started) < 40  # the writes queued behind the failure were dropped


def test_an_error_in_the_callers_block_drops_the_pending_writes_and_waits_for_the_running_ones() -> None:
    running, done, release = threading.Event(), [], threading.Event()

    def write(index: int) -> None:
        if index == 0:
            running.set()
            release.wait(30)
        done.append(index)

    with pytest.raises(KeyError), ParallelWriter(threads=1) as writer:
        for index in range(4):
            writer.submit(1, write, index)
        running.wait(30)
        threading.Timer(0.5, release.set).start()  # write 0 is still running when the block ends
        raise KeyError("the forward failed")
    assert done == [0]  # the running write finished; the three queued behind it were cancelled
