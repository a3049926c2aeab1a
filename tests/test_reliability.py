"""Reliability and security: bad input, crashes and untrusted files never lose work or run code.

Every bad input of docs/reliability.md is generated here, in tmp_path (nothing binary is committed), and each
test asserts the documented outcome: converted and used, skipped with a warning listing the files (switch:
`data.on_bad_sample`), or one `dinov3ds: error:` line naming the file and the fix with exit code 2. Commands go
through `dinov3ds.cli.main` in this process (imports are paid once); only the SIGTERM test needs a real process.
A random-weight ViT-S/16 cut to one block, 32 px images and no loader workers (except where a worker is the
point) keep the whole file under a minute on two CPU cores.
"""

from __future__ import annotations

import ast
import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch._utils import ExceptionWrapper

import dinov3ds.models.checkpoints
from dinov3ds import cli
from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.data.build import build_datasets
from dinov3ds.data.medical import load_volume
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.errors import DataWarning, UserError
from tests.conftest import tiny

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "dinov3ds"
DOC = REPO / "docs" / "reliability.md"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

TINY = tiny("data.batch_size=4", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1")



def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    """The user-error contract: exit 2, and the last stderr line is the only `dinov3ds: error:` line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dinov3ds: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ------------------------------------------------------------------------------------------------------------
# The bad-input corpus, written on demand
# ------------------------------------------------------------------------------------------------------------


def _rgb(size: tuple[int, int] = (40, 40), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(_rgb((64, 64))).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_as_png(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


def odd_but_valid_images(folder: Path) -> list[Path]:
    """Formats that are converted to 8-bit RGB and used: 16-bit, RGBA, palette, CMYK, EXIF-rotated, 1x1, smaller
    than the crop, a name with spaces and a name that is not UTF-8 (Latin-1 bytes from an old archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    deep = np.tile(np.linspace(0, 4000, 40).astype(np.uint16), (40, 1))
    rgba = np.dstack([_rgb(seed=1), np.full((40, 40), 128, np.uint8)])
    palette = Image.fromarray((np.arange(1600).reshape(40, 40) % 7).astype(np.uint8), mode="P")
    palette.putpalette(list(range(256)) * 3)
    exif_image = Image.fromarray(_rgb((48, 24), seed=2))
    exif = exif_image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    written = {
        "deep16.png": lambda p: Image.fromarray(deep).save(p),
        "alpha.png": lambda p: Image.fromarray(rgba).save(p),
        "palette.png": lambda p: palette.save(p),
        "cmyk.jpg": lambda p: Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(p, quality=95),
        "phone.jpg": lambda p: exif_image.save(p, exif=exif),
        "one_pixel.png": lambda p: Image.fromarray(_rgb((1, 1), seed=3)).save(p),
        "small.png": lambda p: Image.fromarray(_rgb((8, 6), seed=4)).save(p),
        "with spaces in name.png": lambda p: Image.fromarray(_rgb(seed=5)).save(p),
        os.fsdecode(b"latin1 caf\xe9.png"): lambda p: Image.fromarray(_rgb(seed=6)).save(p),
    }
    paths = []
    for name, write in written.items():
        write(folder / name)
        paths.append(folder / name)
    return paths


# ------------------------------------------------------------------------------------------------------------
# 1. Bad input: classification
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    root: Path
    odd: list[Path]
    checkpoint: Path
    work: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """A classification folder holding every odd-but-valid format in both splits, checked and trained on."""
    work = tmp_path_factory.mktemp("reliability")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOV3DS_CACHE", str(work / "cache"))
        patch.setenv("DINOV3DS_CHECKPOINTS", str(work / "no_checkpoints"))
        root = make_classification_folder(
            work / "data", num_classes=2, train_per_class=3, val_per_class=1, size=32
        )
        odd = odd_but_valid_images(root / "train" / "class_00")
        odd_but_valid_images(root / "val" / "class_01")
        assert main(["check-data", *TINY, f"data.root={root}"]) == 0
        assert main(["train", *TINY, f"data.root={root}", f"output_dir={work / 'run'}"]) == 0
    return Trained(root, odd, work / "run" / "checkpoints" / "last.ckpt", work)


def test_odd_but_valid_images_are_converted_trained_and_predicted(trained: Trained, capsys, tmp_path):
    assert trained.checkpoint.is_file()
    code, out, err = run(["predict", "--checkpoint", trained.checkpoint, trained.odd[0].parent, "--out", tmp_path / "p"],
                         capsys)  # fmt: skip
    assert code == 0, err
    rows = (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()
    predicted = [re.search(r'"image": "(.*?)"', row).group(1) for row in rows]
    assert len(predicted) == 3 + len(trained.odd)  # the generated images + every odd one
    assert any("with spaces in name.png" in name for name in predicted)
    assert any("caf" in name for name in predicted)  # the non-UTF-8 name, escaped, not a crash
    assert (tmp_path / "p" / "predictions.csv").read_text(errors="replace").count("\n") == len(rows) + 1


def test_check_data_passes_a_clean_dataset_with_a_summary(trained: Trained, capsys):
    code, out, err = run(["check-data", *TINY, f"data.root={trained.root}"], capsys)
    assert code == 0, err
    assert (
        f"{trained.root}: images checked (train: {6 + len(trained.odd)}, val: {2 + len(trained.odd)}); no problems"
        in out
    )


def test_check_data_reports_every_classification_problem_at_once(tmp_path, capsys):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=16
    )
    bad = [truncated_jpeg(root / "train" / "class_00" / "cut.jpg"), zero_byte(root / "train" / "class_01" / "empty.jpg"),
           text_as_png(root / "val" / "class_00" / "notes.png")]  # fmt: skip
    (root / "train" / "class_02").mkdir()  # a class folder with no images (and missing from val)
    code, out, err = run(["check-data", *TINY, f"data.root={root}"], capsys)
    line = one_error_line(code, err)
    assert "5 problems" in line and str(root) in line
    for path in bad:
        assert re.search(rf"cannot read image {re.escape(str(path))}: .*; remove or replace it", out), out
    assert f"class folder {root / 'train' / 'class_02'} has no images" in out
    assert "train and val class folders differ (['class_02'])" in out


def test_empty_split_folder_is_one_line(tmp_path, capsys):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=1, val_per_class=1, size=16
    )
    for path in sorted((root / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    code, out, err = run(["check-data", *TINY, f"data.root={root}"], capsys)
    assert f"split folder {root / 'val'} is empty" in out and "1 problems" in one_error_line(code, err)
    with pytest.raises(
        UserError, match=rf"split folder {re.escape(str(root / 'val'))} has no class subfolders"
    ):
        build_datasets(load_config(None, [*TINY, f"data.root={root}"]), MEAN, STD)


def test_empty_class_folder_is_an_error_or_skipped_with_a_visible_warning(tmp_path):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=16
    )
    (root / "train" / "zebra").mkdir()
    (root / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"class folder .*zebra has no images.*data.on_bad_sample=warn"):
        build_datasets(load_config(None, [*TINY, f"data.root={root}"]), MEAN, STD)
    with warnings.catch_warnings(record=True) as caught:
        cli._quiet_libraries()  # the CLI hides library warnings, but never these
        splits = build_datasets(
            load_config(None, [*TINY, f"data.root={root}", "data.on_bad_sample=warn"]), MEAN, STD
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2 and all("zebra has no images" in m and "skipping" in m for m in messages)
    assert splits.class_names == ["class_00", "class_01", "zebra"] and len(splits.train) == 4


def test_unreadable_image_found_in_a_loader_worker_is_one_cli_line(tmp_path, capsys):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=16
    )
    cut = truncated_jpeg(root / "train" / "class_01" / "cut.jpg")
    args = [
        "train",
        *TINY,
        f"data.root={root}",
        "data.num_workers=1",
        "data.augment=true",
        "data.batch_size=1",
        f"output_dir={tmp_path / 'run'}",
    ]  # batch 1: drop_last cannot drop the broken file
    line = one_error_line(*run(args, capsys)[::2])
    assert (
        line
        == f"dinov3ds: error: cannot read image {cut}: image file is truncated (1 bytes not processed); remove or replace it"
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_skipped_with_a_warning_under_warn(tmp_path, capsys, recwarn, workers):
    root = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=3, val_per_class=1, size=16)
    cut = truncated_jpeg(root / "train" / "class_01" / "cut.jpg")
    args = ["train", *TINY, f"data.root={root}", f"data.num_workers={workers}", "data.augment=true",
            "data.batch_size=1", "data.on_bad_sample=warn", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    if workers == 0:  # a worker process's warnings stay in that process, out of this test's sight
        messages = [str(w.message) for w in recwarn if issubclass(w.category, DataWarning)]
        assert any(f"cannot read image {cut}" in m and "skipped (data.on_bad_sample=warn)" in m for m in messages)


# ------------------------------------------------------------------------------------------------------------
# 1. Bad input: segmentation and volumes
# ------------------------------------------------------------------------------------------------------------

SEG = ["task=segmentation", "data.dataset=segmentation_folder", "data.num_classes=3"]


@pytest.fixture
def seg_root(tmp_path) -> Path:
    return make_segmentation_folder(
        tmp_path / "seg", layout="folder", num_classes=3, train=4, val=2, size=(24, 24)
    )


def test_check_data_reports_every_segmentation_problem_at_once(seg_root, capsys):
    images, masks = seg_root / "images" / "train", seg_root / "annotations" / "train"
    first, second, third, fourth = sorted(masks.glob("*.png"))
    Image.new("L", (5, 7)).save(first)  # a mask of another size than its image
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(
        second
    )  # 7 >= 3 classes and not the ignore index (255)
    third.unlink()  # an image without a mask
    Image.new("L", (24, 24)).save(masks / "stray.png")  # a mask without an image
    truncated_jpeg(fourth)  # a mask that does not decode
    for path in (seg_root / "images" / "val").glob("*"):
        path.unlink()  # an empty val split: its masks are strays now
    code, out, err = run(["check-data", *TINY, *SEG, f"data.root={seg_root}"], capsys)
    line = one_error_line(code, err)
    assert "problems" in line
    expected = [
        rf"mask {re.escape(str(first))} is 5x7 but image .*{first.name} is 24x24; masks must match",
        rf"mask {re.escape(str(second))} has label values \[7\] outside 0..2 and ignore 255",
        rf"image {re.escape(str(images / third.name))} has no mask \(expected {re.escape(str(third))}\)",
        rf"mask {re.escape(str(masks / 'stray.png'))} has no image",
        rf"cannot read image {re.escape(str(fourth))}",
        r"split val is empty: no image/mask pairs",
    ]
    for pattern in expected:
        assert re.search(pattern, out), f"{pattern!r} not in\n{out}"


def test_orphan_images_and_masks_error_or_skip_with_a_warning_listing_them(seg_root):
    lonely_image = seg_root / "images" / "train" / "img_00000001.png"
    (seg_root / "annotations" / "train" / "img_00000001.png").unlink()
    lonely_mask = seg_root / "annotations" / "train" / "extra.png"
    Image.new("L", (24, 24)).save(lonely_mask)
    config = [*TINY, *SEG, f"data.root={seg_root}"]
    with pytest.raises(UserError) as error:
        build_datasets(load_config(None, config), MEAN, STD)
    assert str(lonely_image) in str(error.value) and str(lonely_mask) in str(error.value)
    assert "data.on_bad_sample=warn" in str(error.value) and "\n" not in str(error.value)
    with warnings.catch_warnings(record=True) as caught:
        cli._quiet_libraries()
        splits = build_datasets(load_config(None, [*config, "data.on_bad_sample=warn"]), MEAN, STD)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert str(lonely_image) in message and str(lonely_mask) in message and "skipping" in message
    assert len(splits.train) == 3


def test_bad_mask_found_in_a_loader_worker_unwraps_to_the_original_message(seg_root):
    """Size and label-value problems surface in a DataLoader worker; the CLI prints the original line.

    The worker's exception goes through torch's own `ExceptionWrapper`, exactly as a worker sends it back, without
    a process: a real worker that raised takes 5 s to shut down (the CLI case above uses one)."""
    mask = seg_root / "annotations" / "val" / "img_00000000.png"
    for content, pattern in (
        (Image.new("L", (5, 5)), r"is 5x5 but image .* is 24x24"),
        (Image.fromarray(np.full((24, 24), 9, np.uint8)), r"label values \[9\] outside 0..2"),
    ):
        content.save(mask)
        val = build_datasets(load_config(None, [*TINY, *SEG, f"data.root={seg_root}"]), MEAN, STD).val
        try:
            val[0]
        except UserError:
            wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
        with pytest.raises(UserError) as error:
            wrapped.reraise()
        assert "Original Traceback" in str(error.value)  # how torch re-raises it
        line = cli._one_line(error.value)
        assert line.startswith(f"mask {mask}") and re.search(pattern, line) and "\n" not in line


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nifti_with_nan_or_inf_is_refused_with_the_count(tmp_path, value):
    data = np.ones((4, 4, 3), np.float32)
    data[1, 2, 0] = value
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: contains 1 NaN/Inf voxels; fix the scan"):
        load_volume(path)


def _vm_hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_huge_image_slide_predict_keeps_memory_bounded(monkeypatch):
    """3000x2000 (6 MP; 10000x8000 takes ~25 s on 2 cores, measured once for docs/reliability.md): the windows
    go through the model at most `window_batch` at a time, and the extra peak memory (RSS high-water mark) stays
    within 96 bytes per pixel for 3 classes (about 65 measured: the float image, the logit sum, the softmax)."""
    from dinov3ds.models.tasks import Segmenter, backbone_from_config

    config = load_config(
        None, [*TINY, *SEG, "data.image_size=128", "inference.stride=128", "inference.window_batch=16"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Segmenter(backbone_from_config(config), 3, config, ["a", "b", "c"]).eval()
    height, width = 2000, 3000
    image = Image.fromarray(
        np.tile(_rgb((128, 128)), (height // 128 + 1, width // 128 + 1, 1))[:height, :width]
    )
    forward, batches = model.forward, []
    monkeypatch.setattr(model, "forward", lambda x: batches.append(len(x)) or forward(x))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        before = _vm_hwm_mb()
    except OSError:
        before = None
    labels = model.predict(image, mode="slide")
    assert labels.shape == (height, width) and labels.max() < 3
    assert max(batches) <= 16 and sum(batches) == 16 * 24  # every 128-px window once, never all at once
    if before is not None:
        extra = _vm_hwm_mb() - before
        assert extra < 96 * height * width / 2**20, f"slide predict took {extra:.0f} MB more"


# ------------------------------------------------------------------------------------------------------------
# 2. Config and checkpoint errors
# ------------------------------------------------------------------------------------------------------------


def test_missing_required_key_is_one_line(seg_root, tmp_path, capsys):
    args = ["train", *TINY, "task=segmentation", "data.dataset=segmentation_folder", f"data.root={seg_root}",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    line = one_error_line(*run(args, capsys)[::2])
    assert "data.class_names (or data.num_classes) is required" in line


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["head.name=unet"], r"head 'unet' is a segmentation head; classification uses head.name: linear"),
        ([*SEG, "head.name=cls"], r"head 'cls' is unknown: choose one of .*fapm.*linear"),
        ([*SEG, "head.name=fapm", "backbone.layers=[0]"], r"the fapm head needs 4 backbone taps, got 1"),
    ],
    ids=["segmentation-head-for-classification", "unknown-segmentation-head", "fapm-with-one-tap"],
)
def test_head_that_does_not_fit_task_or_backbone_is_one_line(overrides, pattern, seg_root, tmp_path, capsys):
    root = (
        seg_root
        if "task=segmentation" in overrides
        else make_classification_folder(
            tmp_path / "c", num_classes=2, train_per_class=1, val_per_class=1, size=16
        )
    )
    args = ["train", *TINY, f"data.root={root}", f"output_dir={tmp_path / 'run'}", *overrides]
    assert re.search(pattern, one_error_line(*run(args, capsys)[::2]))


def _edited_checkpoint(source: Path, target: Path, edit) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target)
    return target


def test_checkpoint_from_a_newer_format_is_refused(trained: Trained, tmp_path, capsys):
    newer = _edited_checkpoint(
        trained.checkpoint,
        tmp_path / "newer.ckpt",
        lambda c: c["dinov3ds"].update(format_version=dinov3ds.models.checkpoints.FORMAT_VERSION + 1),
    )
    for command in (
        ["predict", "--checkpoint", newer, trained.odd[0], "--out", tmp_path / "p"],
        ["eval", "--checkpoint", newer],
    ):
        line = one_error_line(*run(command, capsys)[::2])
        assert (
            "newer.ckpt has checkpoint format 2, newer than this dinov3ds understands (1); upgrade dinov3ds"
            in line
        )


def test_checkpoint_trained_on_other_backbone_weights_is_refused(trained: Trained, tmp_path, capsys):
    """The checkpoint records the weight file's SHA-256; a different file under that name is refused."""
    impostor = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    impostor.write_bytes(b"some other weights")

    def edit(checkpoint):
        checkpoint["dinov3ds"]["backbone"].update(weights=impostor.name, sha256="ab" * 32)
        checkpoint["dinov3ds"]["config"]["backbone"]["weights"] = str(impostor)

    other = _edited_checkpoint(trained.checkpoint, tmp_path / "other.ckpt", edit)
    for command in (
        ["predict", "--checkpoint", other, trained.odd[0], "--out", tmp_path / "p"],
        ["eval", "--checkpoint", other],
    ):
        line = one_error_line(*run(command, capsys)[::2])
        assert (
            f"was trained on backbone weights {impostor.name} (sha256 abababababab…) but {impostor} has sha256"
            in line
        )
        assert "put the original weights there" in line


# ------------------------------------------------------------------------------------------------------------
# 3. Crashes: signals, full disk, unwritable output
# ------------------------------------------------------------------------------------------------------------


def test_sigterm_saves_last_checkpoint_and_resume_continues(tmp_path, capsys):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=2, size=16
    )
    common = [
        *TINY,
        f"data.root={root}",
        "data.batch_size=2",
        "data.augment=true",
        f"output_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dinov3ds", "train", *common, "trainer.max_epochs=10000"], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # last.ckpt of epoch 0 exists: training is under way, the handler installed
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    line = one_error_line(process.returncode, err)
    assert re.fullmatch(
        rf"dinov3ds: error: training interrupted by SIGTERM at epoch (\d+), step (\d+); saved "
        rf"{re.escape(str(last))}; continue with `dinov3ds train --resume` and the same config",
        line,
    )
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] > 8  # saved at a batch end after epoch 0's 8 steps, not the epoch-0 file
    code, out, err = run(["train", "--resume", *common, f"trainer.max_epochs={saved['epoch'] + 2}"], capsys)
    assert code == 0, err
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == saved["epoch"] + 1 and final["global_step"] == 8 * (saved["epoch"] + 2)


def test_full_disk_keeps_the_previous_checkpoint_and_is_one_line(tmp_path, capsys, monkeypatch):
    root = make_classification_folder(
        tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=16
    )
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 1:
            handle.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(dinov3ds.models.checkpoints.torch, "save", save_until_full)
    args = ["train", *TINY, f"data.root={root}", "trainer.max_epochs=3", f"output_dir={tmp_path / 'run'}"]
    line = one_error_line(*run(args, capsys)[::2])
    assert re.search(
        r"cannot write checkpoint .*\.ckpt: No space left on device; free disk space or choose a "
        r"writable output_dir \(the previous checkpoint is intact\)",
        line,
    )
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary left behind
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0


def test_unwritable_output_dir_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = ["train", *TINY, f"data.root={tmp_path}", f"output_dir={blocker / 'run'}"]
    line = one_error_line(*run(args, capsys)[::2])
    assert f"output_dir {blocker / 'run'} is not writable" in line and "choose another output_dir" in line


# ------------------------------------------------------------------------------------------------------------
# 4. Untrusted files: no code runs from a checkpoint, a config or a data file
# ------------------------------------------------------------------------------------------------------------


def _calls(root: Path):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield path, node


def _name(node: ast.expr) -> str:
    return ast.unparse(node)


def test_every_torch_load_is_weights_only():
    found = []
    for path, call in _calls(SOURCE):
        if _name(call.func) == "torch.load":
            keywords = {k.arg: k.value for k in call.keywords}
            ok = (
                isinstance(keywords.get("weights_only"), ast.Constant)
                and keywords["weights_only"].value is True
            )
            found.append((f"{path.relative_to(REPO)}:{call.lineno}", ok))
    assert found, "no torch.load found: the scan is broken"
    assert all(ok for _, ok in found), [where for where, ok in found if not ok]


UNSAFE = {"eval", "exec", "compile", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads",
          "marshal.loads", "os.system", "subprocess.call", "dill.load"}  # fmt: skip


def test_no_eval_exec_pickle_or_unsafe_yaml_on_user_data():
    offenders = [
        f"{p.relative_to(REPO)}:{c.lineno} {_name(c.func)}"
        for p, c in _calls(SOURCE)
        if _name(c.func) in UNSAFE
    ]
    offenders += [f"{p.relative_to(REPO)}:{c.lineno} allow_pickle" for p, c in _calls(SOURCE)
                  if any(k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in c.keywords)]  # fmt: skip
    assert offenders == []


# ------------------------------------------------------------------------------------------------------------
# The document cannot drift: every test it cites exists
# ------------------------------------------------------------------------------------------------------------


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_reliability_doc_cites_only_existing_tests():
    rows = [
        line for line in DOC.read_text().splitlines() if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    cited = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)", "\n".join(rows))
    assert len(cited) >= 30, "the tables should name a test for every bad input and fault"
    missing = [f"{file}::{name}" for file, name in cited if name not in _test_names(REPO / file)]
    assert missing == []
    # ... and every test of this file is cited somewhere in the doc.
    uncited = _test_names(Path(__file__)) - {
        name for file, name in cited if file == "tests/test_reliability.py"
    }
    assert uncited == set()
