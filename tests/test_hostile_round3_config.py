"""Issue 31, round 3, items 11, 12, 15, 18, 21, 26, 27, 28, 34, 35 and 36: head options out of range, device
counts the machine lacks, a cache folder that cannot be written, a slide crop far beyond the image or memory,
DICOM files that cannot be slices, and an output_dir inside the data.

Rows run through the real CLI as the hostile-inputs corpus does (exit 2, one line, nothing outside the output
folder changed); what must succeed instead is a small test of its own, named with the item number.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import types
import typing
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_nnunet_dataset
from dinov3ds.errors import DataWarning, UserError
from dinov3ds.heads import HEADS, check_head_options, describe_option, head_options
from dinov3ds.models import inference
from dinov3ds.models.hardware import check_devices, usable_cores
from tests import test_hostile_inputs as corpus
from tests.conftest import tiny
from tests.test_hostile_inputs import Workspace, predict, save_image, train_cls

trained, workspace, offline = corpus.trained, corpus.workspace, corpus.offline  # the corpus's fixtures, registered here

NNUNET_CT = ["task=segmentation", "data.dataset=nnunet", "data.image_size=32", "data.batch_size=8",
             "data.val_fraction=0.5", "head.name=linear", "trainer.max_epochs=1"]  # fmt: skip


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny CT nnU-Net dataset (2 training cases), a checkpoint trained on it (to predict DICOM series) and the
    slice cache that training filled."""
    work = tmp_path_factory.mktemp("ct")
    root = make_nnunet_dataset(work / "Dataset002_CT", training=2, test=0, modality="ct", shape=(16, 16, 4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOV3DS_CACHE", str(work / "cache"))
        assert main(["train", *tiny(*NNUNET_CT, f"data.root={root}"), f"output_dir={work / 'run'}"]) == 0
    return root, work / "run" / "checkpoints" / "last.ckpt", work / "cache"


@pytest.fixture
def space(workspace, ct) -> Workspace:
    """The corpus's workspace with a copy of the CT checkpoint at ckpt/ct.ckpt."""
    shutil.copy(ct[1], workspace.root / "ckpt" / "ct.ckpt")
    return workspace


def train_seg(w: Workspace, head: str, options: str, *extra: str) -> list[str]:
    return ["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={w.segmentation_data}",
                           "data.num_classes=3", f"head.name={head}", f"head.options={options}"),
            f"output_dir={w.root / 'out'}", *extra]  # fmt: skip


def write_series(folder: Path) -> None:
    """tests/test_dicom.py's series, imported here so that the tests of other items run without pydicom."""
    pytest.importorskip("pydicom", reason="the medical extra")
    from tests.test_dicom import write_series as write

    write(folder)


def dicomdir() -> str:
    """pydicom's own DICOMDIR test file."""
    return pytest.importorskip("pydicom.data", reason="the medical extra").get_testdata_file("DICOMDIR")


def predict_series(w: Workspace, change: Callable[[Path], None]) -> list[str]:
    """A 7-slice CT series in scans/series1 (pydicom's CT_small moved along its normal), changed by `change`."""
    folder = w.root / "scans" / "series1"
    write_series(folder)
    change(folder)
    return ["predict", "--checkpoint", str(w.root / "ckpt" / "ct.ckpt"), str(w.root / "scans"), "--out", str(w.root / "out")]


def first_slice(folder: Path) -> Path:
    return sorted(folder.iterdir())[0]


def add_rgb_secondary_capture(folder: Path) -> None:
    """A screenshot kept with the CT series (same series UID, as some exporters do): RGB, 8 bits, no geometry."""
    import pydicom

    ds = pydicom.dcmread(first_slice(folder))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(int(ds.Rows) * int(ds.Columns) * 3)
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, key)
    ds.save_as(folder / "sc.dcm", enforce_file_format=True)


def zero_pixel_spacing(folder: Path) -> None:
    import pydicom

    path = first_slice(folder)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0, ds.PixelSpacing[1]]
    ds.save_as(path)


def truncate_every_file(folder: Path, keep: int) -> None:
    for path in folder.iterdir():
        path.rename(path.with_suffix(".dcm")).write_bytes(path.with_suffix(".dcm").read_bytes()[:keep])


def cut_pixels(folder: Path) -> None:
    path = first_slice(folder)
    path.write_bytes(path.read_bytes()[:-5000])


# (row id, build the inputs and return the command line, the one error line must match)
ROWS: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    ("r3-11-pmt-mlp-dim-zero", lambda w: train_seg(w, "pmt", "{mlp_dim: 0}"),
     r"head\.options\.mlp_dim=0 is outside its range: give an integer in \[1, 16384\] or null$"),
    ("r3-11-unet-sum-width-as-text", lambda w: train_seg(w, "unet_sum", "{base_channels: '64'}"),
     r"head\.options\.base_channels='64' is outside its range: give an integer in \[1, 16384\]$"),
    ("r3-11-linear-dropout-one", lambda w: train_seg(w, "linear", "{dropout: 1.0}"),
     r"head\.options\.dropout=1\.0 is outside its range: give a number in \[0, 1\)$"),
    ("r3-11-segdino-unknown-variant", lambda w: train_seg(w, "segdino", "{variant: newest}"),
     r"head\.options\.variant='newest' is outside its range: give one of paper, upstream$"),
    ("r3-11-options-of-a-classification-head", lambda w: train_cls(w, "head.options={dropout: 0.5}"),
     r"head\.options \{'dropout': 0\.5\} are for segmentation heads; .* remove head\.options"),
    ("r3-12-pmt-annealing-power-negative", lambda w: train_seg(w, "pmt", "{annealing_power: -3}"),
     r"head\.options\.annealing_power=-3 is outside its range: give a number in \(0, 10\]$"),
    ("r3-15-cpu-devices-beyond-the-cores",
     lambda w: train_cls(w, "trainer.accelerator=cpu", f"trainer.devices={max(64, usable_cores() + 1)}"),
     r"trainer\.devices (\d+) asks for \1 CPU training processes, but this process may use \d+ cores "
     r"\(os\.sched_getaffinity\): give trainer\.devices from 1 to \d+$"),
    ("r3-15-cpu-devices-zero", lambda w: train_cls(w, "trainer.accelerator=cpu", "trainer.devices=0"),
     r"trainer\.devices 0 asks for 0 CPU training processes"),
    ("r3-28-gpu-list-on-the-cpu", lambda w: train_cls(w, "trainer.accelerator=cpu", "trainer.devices=[0, 1]"),
     r"trainer\.devices \[0, 1\] names GPUs, but this run trains on the CPU .*: give a number of CPU processes"),
    ("r3-28-gpu-string-on-the-cpu", lambda w: train_cls(w, "trainer.accelerator=cpu", "trainer.devices='0,1'"),
     r"trainer\.devices '0,1' names GPUs"),
    ("r3-28-devices-not-a-count", lambda w: train_cls(w, "trainer.devices=many"),
     r"trainer\.devices 'many' is not a count, a list of GPU indices or auto"),
    ("r3-28-accelerator-lightning-refuses", lambda w: train_cls(w, "trainer.accelerator=mps"),
     r"trainer: `MPSAccelerator` can not run on your system.*; fix the trainer section$"),
    ("r3-21-slide-crop-16384", lambda w: predict(w, w.segmentation_checkpoint, save_image(w.root / "a.png", (40, 30)),
                                                 "--mode", "slide", "inference.crop=16384"),
     r"inference\.crop 16384x16384 on a \d+x\d+ image: a window would be more than 64 times the image"),
    ("r3-26-rgb-secondary-capture-in-a-ct-series", lambda w: predict_series(w, add_rgb_secondary_capture),
     r"series1/sc\.dcm is a colour image \(RGB, 3 samples per pixel\), not a grey-value slice"),
    ("r3-27-pixel-spacing-zero", lambda w: predict_series(w, zero_pixel_spacing),
     r"series1/\w+: PixelSpacing \[0\.0, 0\.66\d*\] mm is not two positive sizes"),
    ("r3-35-dicom-files-cut-inside-the-header", lambda w: predict_series(w, lambda f: truncate_every_file(f, 100)),
     r"series1/\w+\.dcm is truncated or not a DICOM file \(100 bytes, no 'DICM' marker at byte 128\)"),
    ("r3-35-dicom-file-cut-inside-the-pixels", lambda w: predict_series(w, cut_pixels),
     r"series1/\w+ is truncated: its pixel data holds \d+ of 32768 bytes; copy or export it again"),
    ("r3-36-output-dir-in-the-training-split",
     lambda w: train_cls(w, f"output_dir={w.classification_data / 'train' / 'run'}"),
     r"output_dir \S+/cls/train/run is inside the training split's folder \S+/cls/train: the run's pictures"),
    ("r3-36-output-dir-in-the-validation-masks",
     lambda w: train_seg(w, "linear", "{}", f"output_dir={w.segmentation_data / 'annotations' / 'val' / 'pictures'}"),
     r"output_dir \S+/seg/annotations/val/pictures is inside the validation split's folder \S+/seg/annotations/val:"),
]  # fmt: skip


@pytest.mark.parametrize("case, build, message", ROWS, ids=[row[0] for row in ROWS])
def test_r3_config_refused_in_one_line(case, build, message, space, offline, capsys):
    corpus.assert_refused(build(space), space.root, message, capsys)


# --- 11, 12: every head option has a range, checked before anything runs ---------------------------------------


def option_hints(name: str) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(HEADS[name].__init__, include_extras=True)
    return {key: hints[key] for key in head_options(name)}


def bounded(annotation) -> bool:
    """A type whose every value is bounded: bool, a Literal, or a number with both bounds, maybe in a list or
    beside null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (bool, type(None)) or origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, tuple, Sequence):
        return all(bounded(arg) for arg in args if arg is not Ellipsis)
    if origin is typing.Annotated:
        rules = {name for item in args[1:] for rule in getattr(item, "metadata", [item])
                 for name in ("ge", "gt", "le", "lt") if getattr(rule, name, None) is not None}  # fmt: skip
        return bool(rules & {"ge", "gt"}) and bool(rules & {"le", "lt"})
    return False


@pytest.mark.parametrize("name", sorted(HEADS))
def test_r3_11_every_option_of_every_head_has_a_range(name):
    unbounded = [key for key, hint in option_hints(name).items() if not bounded(hint)]
    assert not unbounded, f"head {name}: options without a range: {unbounded}"


def numeric_rule(annotation):
    """(base type, item in a list?, optional?, ge, gt, le, lt) of a numeric option, else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    inner, listed = args[0], False
    if typing.get_origin(inner) in (list, tuple, Sequence):
        inner, listed = typing.get_args(inner)[0], True
    if typing.get_origin(inner) is not typing.Annotated:
        return None
    base, *meta = typing.get_args(inner)
    bounds = {n: getattr(r, n) for m in meta for r in getattr(m, "metadata", [m]) for n in ("ge", "gt", "le", "lt")
              if getattr(r, n, None) is not None}  # fmt: skip
    return base, listed, bounds


CASES = [(name, key) for name in sorted(HEADS) for key, hint in option_hints(name).items() if numeric_rule(hint)]


@pytest.mark.parametrize("name, key", CASES, ids=[f"{n}.{k}" for n, k in CASES])
def test_r3_11_each_bound_is_where_the_message_says(name, key):
    """The values at each closed bound pass, the next ones outside fail, and the message names the interval."""
    base, listed, bounds = numeric_rule(option_hints(name)[key])
    step = 1 if base is int else 1e-9
    inside = [bounds["ge"]] if "ge" in bounds else [bounds["gt"] + step]
    inside += [bounds["le"]] if "le" in bounds else [bounds["lt"] - step]
    outside = [bounds["ge"] - step if "ge" in bounds else bounds["gt"], bounds["le"] + step if "le" in bounds else bounds["lt"]]
    wrap = (lambda v: [v]) if listed else (lambda v: v)
    for value in inside:
        assert check_head_options(name, {key: wrap(value)}) == {key: (tuple if "tuple" in str(option_hints(name)[key])
                                                                      else list)([value]) if listed else value}
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}"
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})"
    for value in outside:
        with pytest.raises(UserError) as error:
            check_head_options(name, {key: wrap(value)})
        assert str(error.value).startswith(f"head.options.{key}={wrap(value)!r} is outside its range: give ")
        assert f" in {low}, {high}" in str(error.value)


def test_r3_11_values_are_checked_as_yaml_gives_them():
    assert check_head_options("pmt", {"mlp_dim": None, "masked_attention": False}) == {"mlp_dim": None, "masked_attention": False}
    assert check_head_options("linear", {"dropout": 0}) == {"dropout": 0.0}  # an integer is a number
    assert check_head_options("unet_adapter", {"decoder_channels": [8, 8, 8, 8]}) == {"decoder_channels": (8, 8, 8, 8)}
    for options in ({"num_queries": True}, {"num_queries": 2.5}, {"masked_attention": "yes"}, {"annealing_start": 3},
                    {"mlp_dim": datetime.date(2025, 1, 1)}):  # YAML reads 2025-01-01 as a date
        with pytest.raises(UserError, match=rf"head\.options\.{next(iter(options))}="):
            check_head_options("pmt", options)
    with pytest.raises(UserError, match="unknown to head 'pmt'"):
        check_head_options("pmt", {"mlp": 3})


def test_r3_11_the_range_in_words():
    hints = option_hints("pmt")
    assert describe_option(hints["mlp_dim"]) == "an integer in [1, 16384] or null"
    assert describe_option(hints["annealing_start"]) == "a list, each an integer in [0, 100000000] or null"
    assert describe_option(hints["annealing_power"]) == "a number in (0, 10]"
    assert describe_option(hints["masked_attention"]) == "true or false"
    assert describe_option(option_hints("linear")["dropout"]) == "a number in [0, 1)"
    assert describe_option(option_hints("segdino")["variant"]) == "one of paper, upstream"
    assert describe_option(option_hints("unet_adapter")["decoder_channels"]) == "a list, each an integer in [1, 16384]"


def test_r3_11_head_options_are_checked_before_data_weights_or_folders(tmp_path, capsys):
    """A missing data.root and missing weights would be named later: the option is named first, nothing made."""
    argv = ["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={tmp_path / 'none'}",
                           "data.num_classes=3", "head.name=pmt", "head.options={annealing_power: -3}",
                           f"backbone.weights={tmp_path / 'missing.pth'}"), f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    assert main(argv) == 2
    assert "head.options.annealing_power=-3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- 15, 28: device counts ----------------------------------------------------------------------------------------


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_r3_15_gpu_counts_and_indices_the_machine_lacks_are_refused(monkeypatch):
    gpus(monkeypatch, 2)
    for accelerator, devices in (("auto", 2), ("gpu", 1), ("cuda", [1]), ("auto", "0,1"), ("auto", -1), ("auto", "auto")):
        check_devices(accelerator, devices)
    for devices, message in ((3, r"trainer\.devices 3: this machine has 2 GPU\(s\); give 1 to 2"),
                             (0, r"trainer\.devices 0: this machine has 2 GPU"),
                             ([0, 2], r"trainer\.devices \[0, 2\] names GPU 2; this machine has 2 GPU\(s\), 0 to 1"),
                             ("1,-1", r"names GPU -1"), ([1, 1], r"list each GPU index once"), ([], "once")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            check_devices("auto", devices)
    check_devices("cpu", 1)  # the CPU on a GPU machine: processes, not GPUs
    with pytest.raises(UserError, match=r"\(trainer\.accelerator is cpu\)"):
        check_devices("cpu", [0])


def test_r3_15_cpu_processes_up_to_the_usable_cores(monkeypatch):
    gpus(monkeypatch, 0)
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    check_devices("auto", cores), check_devices("cpu", str(cores)), check_devices("auto", 1)
    for devices in (cores + 1, -1, 0):
        with pytest.raises(UserError, match=rf"give trainer\.devices from 1 to {cores}$"):
            check_devices("auto", devices)
    with pytest.raises(UserError, match=r"no CUDA GPU here"):
        check_devices("auto", [0])
    with pytest.raises(UserError, match=r"trainer\.accelerator gpu: this machine has no CUDA GPU"):
        check_devices("gpu", 1)
    check_devices("mps", 3)  # other accelerators are Lightning's to check


# --- 18: a cache folder that cannot be written ----------------------------------------------------------------------


@contextmanager
def small_mount(folder: Path, options: str):
    """A tmpfs at `folder` with mount `options` (root), or the test skipped where mounting is not allowed."""
    folder.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # lazily: memory maps may still be open


@pytest.mark.parametrize("options, reason", [("ro,size=1m", "Read-only file system"), ("size=8k", "No space left on device")])
def test_r3_18_a_slice_cache_that_cannot_be_written_is_one_line(ct, tmp_path, monkeypatch, capsys, options, reason):
    root = ct[0]
    with small_mount(tmp_path / "cache", options) as cache:
        monkeypatch.setenv("DINOV3DS_CACHE", str(cache))
        capsys.readouterr()
        assert main(["train", *tiny(*NNUNET_CT, f"data.root={root}"), f"output_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert "Traceback" not in err
        assert re.fullmatch(rf"dinov3ds: error: the slice cache {cache}/volume_slices cannot be written \({reason}\): make "
                            r"it writable or free space there, or set DINOV3DS_CACHE to a folder with room for the slices", line), line
        assert not list(cache.rglob("*.tmp")), "a half-written case was left behind"  # fmt: skip


def test_r3_18_a_read_only_cache_that_holds_every_case_is_used(ct, tmp_path, monkeypatch):
    root, _, filled = ct
    with small_mount(tmp_path / "cache", "size=4m") as cache:
        shutil.copytree(filled, cache, dirs_exist_ok=True)
        assert subprocess.run(["mount", "-o", "remount,ro", str(cache)], capture_output=True).returncode == 0
        monkeypatch.setenv("DINOV3DS_CACHE", str(cache))
        assert main(["train", *tiny(*NNUNET_CT, f"data.root={root}"), f"output_dir={tmp_path / 'run'}"]) == 0


# --- 21: the slide crop against memory ------------------------------------------------------------------------------


def test_r3_21_the_slide_buffers_must_fit_the_free_memory(monkeypatch):
    """1 image 3x40x56, crop 32, stride 16, 5 classes, float32: sums and count 6*40*56*4 = 53,760 bytes where they
    accumulate; no padded copy; its 2 x 3 windows in one batch, (3 + 5)*32*32*4*6 = 196,608 bytes, where it is."""
    images, crop = torch.zeros(1, 3, 40, 56), 32
    logits = lambda x: torch.zeros(x.shape[0], 5, *x.shape[-2:])  # noqa: E731
    for free, fits in ((53_760 + 196_608, True), (53_760 + 196_608 - 1, False)):
        monkeypatch.setattr(inference, "available_memory", lambda device, free=free: free)
        if fits:
            inference.predict_slide(logits, images, crop=crop, stride=16, num_classes=5, window_batch=100)
        else:
            with pytest.raises(UserError, match=r"inference\.crop 32x32 on a 40x56 image needs at least 0\.0 GiB on cpu"):
                inference.predict_slide(logits, images, crop=crop, stride=16, num_classes=5, window_batch=100)
    # Apart: the accumulating device's sums and count only; the padded copy, windows and logits where the image is.
    seen = {}
    monkeypatch.setattr(inference, "available_memory", lambda device: seen.setdefault(str(device), None))
    inference.predict_slide(logits, torch.zeros(2, 3, 20, 24), crop=32, stride=16, num_classes=5, accumulate_device="meta")
    assert set(seen) == {"meta", "cpu"}


def test_r3_21_the_padded_copy_and_batches_are_counted(monkeypatch):
    """2 images 3x20x24 padded to 32x32: sums (2*5 + 1)*32*32*4 = 45,056, the padded copy 2*3*32*32*4 = 24,576,
    one batch of the 2 windows (3 + 5)*32*32*4*2 = 65,536: 135,168 bytes in all."""
    images, logits = torch.zeros(2, 3, 20, 24), (lambda x: torch.zeros(x.shape[0], 5, *x.shape[-2:]))
    monkeypatch.setattr(inference, "available_memory", lambda device: 135_168)
    inference.predict_slide(logits, images, crop=32, stride=16, num_classes=5)
    monkeypatch.setattr(inference, "available_memory", lambda device: 135_167)
    with pytest.raises(UserError, match="needs at least"):
        inference.predict_slide(logits, images, crop=32, stride=16, num_classes=5)


def test_r3_21_a_window_up_to_64_times_the_image_is_still_padded():
    logits = lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:])  # noqa: E731
    assert inference.predict_slide(logits, torch.zeros(1, 3, 4, 4), crop=32, stride=32, num_classes=2).shape[-2:] == (4, 4)
    with pytest.raises(UserError, match=r"inference\.crop 32x32 on a 4x3 image: a window would be more than 64 times"):
        inference.predict_slide(logits, torch.zeros(1, 3, 4, 3), crop=32, stride=32, num_classes=2)


# --- 34: a DICOMDIR is an index, not a slice ------------------------------------------------------------------------


def test_r3_34_a_dicomdir_beside_the_slices_is_skipped_with_a_warning(tmp_path):
    from dinov3ds.data.dicom import is_dicom_series, load_dicom_series

    write_series(tmp_path / "plain")
    expected = load_dicom_series(tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", tmp_path / "with_index")
    shutil.copy(dicomdir(), tmp_path / "with_index" / "DICOMDIR")
    with pytest.warns(DataWarning, match=r"with_index/DICOMDIR is a DICOMDIR \(a disc's index, no image\): skipped"):
        image = load_dicom_series(tmp_path / "with_index")
    assert (image.get_fdata() == expected.get_fdata()).all() and (image.affine == expected.affine).all()
    (tmp_path / "disc").mkdir()
    shutil.copy(dicomdir(), tmp_path / "disc" / "INDEX")  # recognised by its SOP class too
    assert not is_dicom_series(tmp_path / "disc")


def test_r3_34_a_disc_with_its_dicomdir_predicts_the_series_below_it(space, capsys):
    disc = space.root / "disc"
    write_series(disc / "DICOM" / "S1")
    shutil.copy(dicomdir(), disc / "DICOMDIR")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(space.root / "ckpt" / "ct.ckpt"), str(disc), "--out", str(space.root / "out")]) == 0
    assert "DICOMDIR" not in capsys.readouterr().err  # the disc's index is no series and no slice: not even a warning
    assert [p.name for p in (space.root / "out").rglob("*_pred.nii.gz")] == ["S1_pred.nii.gz"]


# --- 35: the right words for a file cut short ---------------------------------------------------------------------


def test_r3_35_a_damaged_dataset_names_its_file(tmp_path):
    from dinov3ds.data.dicom import load_dicom_series

    write_series(tmp_path / "s")
    path = first_slice(tmp_path / "s")
    path.write_bytes(path.read_bytes()[:600])  # the header and part of the dataset, no pixel data
    with pytest.raises(UserError, match=rf"{path.name} holds no pixel data: truncated, or not an image"):
        load_dicom_series(tmp_path / "s")
    path.write_bytes(b"\0" * 60)  # a preamble cut short: no name says DICOM, the zeros do
    with pytest.raises(UserError, match=rf"{path.name} is truncated or not a DICOM file \(60 bytes"):
        load_dicom_series(tmp_path / "s")
    path.unlink()
    (tmp_path / "s" / "notes.txt").write_text("scanned at 9:00")  # other files beside a series are no slices
    with pytest.raises(UserError, match="missing or duplicated"):
        load_dicom_series(tmp_path / "s")
