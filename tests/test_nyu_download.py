"""`dinov3ds download nyu-depth-v2` (issue 36): a tiny labeled .mat written as MATLAB v7.3 writes it (HDF5,
column-major, so h5py sees (N, 3, W, H) images and (N, W, H) depths) and a v5 splits.mat, served from a
loopback HTTP server; the conversion's pixels, millimetres and Eigen split, resuming, the one-line refusals
through the real CLI, and the converted folder trained through the bundled depth_nyu_linear config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data import nyu
from dinov3ds.data.download import MARKER
from dinov3ds.metrics.depth import valid_mask
from tests.conftest import tiny
from tests.test_download import FileServer, _closed_port_url, server  # noqa: F401  (the server fixture)

COUNT, HEIGHT, WIDTH = 6, 48, 64  # not square: a transposed frame cannot pass for a right one
TRAIN, TEST = [1, 3, 4, 6], [2, 5]  # 1-based, as in splits.mat


def scene() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, 3] uint8, depths [N, H, W] float32 metres), random so any flip or transpose shows;
    one unknown pixel (0), one NaN and one beyond 65.535 m."""
    rng = np.random.default_rng(36)
    images = rng.integers(0, 256, (COUNT, HEIGHT, WIDTH, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (COUNT, HEIGHT, WIDTH)).astype(np.float32)
    depths[0, 0, 0], depths[0, 0, 1], depths[1, 2, 3] = 0.0, np.nan, 70.0
    return images, depths


def write_labeled(path: Path, images: np.ndarray, depths: np.ndarray, skip: str = "") -> Path:
    """A labeled file in MATLAB v7.3's layout: HDF5 behind a 512-byte user block, arrays transposed."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        if skip != "images":
            handle["images"] = images.transpose(0, 3, 2, 1)  # [N, H, W, 3] -> [N, 3, W, H]
        if skip != "depths":
            handle["depths"] = depths.transpose(0, 2, 1)  # [N, H, W] -> [N, W, H]
    return path


def write_splits(path: Path, train: list[int] = TRAIN, test: list[int] = TEST) -> Path:
    scipy.io.savemat(path, {"trainNdxs": np.array(train, float)[:, None], "testNdxs": np.array(test, float)[:, None]})
    return path


@pytest.fixture
def release(monkeypatch) -> Callable[[Path], None]:
    """Point the checks at the tiny release: call it with the labeled file whose size is to be expected."""

    def use(labeled: Path) -> None:
        tiny_release = nyu.Release(labeled.stat().st_size, COUNT, HEIGHT, WIDTH, len(TRAIN), len(TEST))
        monkeypatch.setattr(nyu, "RELEASE", tiny_release)

    return use


@pytest.fixture
def served(server: FileServer, release) -> FileServer:  # noqa: F811
    images, depths = scene()
    release(write_labeled(server.folder / nyu.LABELED, images, depths))
    write_splits(server.folder / nyu.SPLITS)
    return server


def download(root: Path, url: str, capsys) -> tuple[int, str]:
    code = main(["download", "nyu-depth-v2", "--root", str(root), "--url", url])
    return code, capsys.readouterr().err


def one_line(code: int, err: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the only `dinov3ds: error:` one (progress bars may
    come before it, as tests/test_reliability.py's contract allows)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dinov3ds: error:")]
    assert code == 2 and "Traceback" not in err and errors == lines[-1:], (code, err)
    return errors[0]


def test_download_converts_pixels_millimetres_and_the_eigen_split_once(served: FileServer, tmp_path, capsys):
    root = tmp_path / "data"
    code, err = download(root, f"{served.url}/", capsys)
    assert code == 0, err
    folder = root / "nyu_depth_v2"
    images, depths = scene()
    for split, indices in (("train", TRAIN), ("val", TEST)):
        assert sorted(p.name for p in (folder / split / "images").iterdir()) == [f"{i:04d}.png" for i in indices]
        assert sorted(p.name for p in (folder / split / "depth").iterdir()) == [f"{i:04d}.png" for i in indices]
        for index in indices:
            picture = np.asarray(Image.open(folder / split / "images" / f"{index:04d}.png"))
            np.testing.assert_array_equal(picture, images[index - 1])
            with Image.open(folder / split / "depth" / f"{index:04d}.png") as stored:
                assert stored.mode.startswith("I;16")
                millimetres = np.asarray(stored)
            expected = np.rint(np.nan_to_num(depths[index - 1].astype(np.float64), nan=0.0) * 1000).clip(0, 65535).astype(np.uint16)
            np.testing.assert_array_equal(millimetres, expected)
    first = np.asarray(Image.open(folder / "train" / "depth" / "0001.png"))
    assert first[0, 0] == 0 and first[0, 1] == 0  # unknown and NaN: 0 = invalid
    assert np.asarray(Image.open(folder / "val" / "depth" / "0002.png"))[2, 3] == 65535  # 70 m clipped
    assert (folder / MARKER).is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([nyu.FOLDER, nyu.LABELED, nyu.SPLITS])  # no staging, no .part
    assert [r.path for r in served.requests] == ["/splits.mat", "/nyu_depth_v2_labeled.mat"]

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    code, err = download(root, _closed_port_url(), capsys)  # second run: nothing fetched, nothing rewritten
    assert code == 0, err
    assert len(served.requests) == 2
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_files_already_in_root_are_only_converted(tmp_path, release, capsys):
    root = tmp_path / "data"
    root.mkdir()
    images, depths = scene()
    release(write_labeled(root / nyu.LABELED, images, depths))
    write_splits(root / nyu.SPLITS)
    code, err = download(root, _closed_port_url(), capsys)  # nothing listens there: no request may be made
    assert code == 0, err
    assert len(list((root / "nyu_depth_v2" / "val" / "images").iterdir())) == len(TEST)


def test_an_interrupted_download_resumes_where_it_stopped(served: FileServer, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    write_splits(root / nyu.SPLITS)  # by hand: the first request is the labeled file's
    served.cut_after = 5000
    line = one_line(*download(root, served.url, capsys))
    assert "kept and resumes" in line
    assert (root / "nyu_depth_v2_labeled.mat.part").stat().st_size == 5000
    assert not (root / "nyu_depth_v2").exists()

    code, err = download(root, served.url, capsys)
    assert code == 0, err
    assert (served.requests[1].range, served.requests[1].status) == ("bytes=5000-", 206)
    assert (root / "nyu_depth_v2" / MARKER).is_file()


def _truncated_on_server(web: FileServer, root: Path, release) -> str:
    labeled = web.folder / nyu.LABELED
    labeled.write_bytes(labeled.read_bytes()[:4000])  # the server's copy is short; the release's size is not
    return "ended after 4,000 of"


def _truncated_by_hand(web: FileServer, root: Path, release) -> str:
    (root / nyu.LABELED).write_bytes((web.folder / nyu.LABELED).read_bytes()[:4000])
    return "rename it to nyu_depth_v2_labeled.mat.part and run again to resume"


def _missing_dataset(web: FileServer, root: Path, release) -> str:
    images, depths = scene()
    release(write_labeled(web.folder / nyu.LABELED, images, depths, skip="depths"))
    return "has no dataset 'depths'"


def _wrong_frame_count(web: FileServer, root: Path, release) -> str:
    images, depths = scene()
    release(write_labeled(web.folder / nyu.LABELED, images[:5], depths[:5]))
    return r"'images' is uint8 (5, 3, 64, 48), expected uint8 (6, 3, 64, 48)"


def _not_hdf5(web: FileServer, root: Path, release) -> str:
    labeled = web.folder / nyu.LABELED
    labeled.write_bytes(b"<html>mirror error page</html>".ljust(labeled.stat().st_size, b" "))
    return "is not a MATLAB v7.3 (HDF5) file"


def _index_out_of_range(web: FileServer, root: Path, release) -> str:
    write_splits(web.folder / nyu.SPLITS, train=[1, 3, 4, 7])
    return "trainNdxs holds indices outside 1..6"


def _index_in_both_splits(web: FileServer, root: Path, release) -> str:
    write_splits(web.folder / nyu.SPLITS, test=[2, 3])
    return "appears twice or in both trainNdxs and testNdxs"


def _split_of_the_wrong_size(web: FileServer, root: Path, release) -> str:
    write_splits(web.folder / nyu.SPLITS, train=[1, 3, 4])
    return "trainNdxs holds 3 indices, expected 4"


def _foreign_folder(web: FileServer, root: Path, release) -> str:
    (root / "nyu_depth_v2").mkdir()
    (root / "nyu_depth_v2" / "mine.txt").write_text("the user's own")
    return "nyu_depth_v2 exists and is not a finished dinov3ds conversion"


CASES = [(f.__name__.lstrip("_").replace("_", "-"), f) for f in (
    _truncated_on_server, _truncated_by_hand, _missing_dataset, _wrong_frame_count, _not_hdf5,
    _index_out_of_range, _index_in_both_splits, _split_of_the_wrong_size, _foreign_folder)]  # fmt: skip


@pytest.mark.parametrize("case, build", CASES, ids=[case for case, _ in CASES])
def test_a_bad_release_is_one_line_exit_2_and_writes_no_dataset(case, build, served, release, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    message = build(served, root, release)
    line = one_line(*download(root, served.url, capsys))
    assert message in line, line
    assert not (root / ".nyu_depth_v2.converting").exists()
    if case == "truncated-by-hand":  # the user's file is theirs: named, never deleted
        assert (root / nyu.LABELED).stat().st_size == 4000
    if case == "foreign-folder":
        assert served.requests == [] and (root / "nyu_depth_v2" / "mine.txt").read_text() == "the user's own"
    else:
        assert not (root / "nyu_depth_v2").exists()


def test_a_killed_conversion_leaves_no_dataset_and_the_next_run_starts_clean(tmp_path, release, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    images, depths = scene()
    labeled, splits = write_labeled(root / nyu.LABELED, images, depths), write_splits(root / nyu.SPLITS)
    release(labeled)
    written = []
    real_write = nyu._write_frame

    def interrupted(*args) -> None:
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(args[2])
        real_write(*args)

    monkeypatch.setattr(nyu, "_write_frame", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nyu.convert(labeled, splits, root / "nyu_depth_v2", MARKER, progress=False)
    assert sorted(p.name for p in root.iterdir()) == [nyu.LABELED, nyu.SPLITS]

    monkeypatch.setattr(nyu, "_write_frame", real_write)
    stale = root / ".nyu_depth_v2.converting" / "train" / "images"  # what a SIGKILL would leave behind
    stale.mkdir(parents=True)
    (stale / "9999.png").write_bytes(b"half")
    folder = nyu.convert(labeled, splits, root / "nyu_depth_v2", MARKER, progress=False)
    assert sorted(p.name for p in (folder / "train" / "images").iterdir()) == [f"{i:04d}.png" for i in TRAIN]
    assert sorted(p.name for p in root.iterdir()) == sorted([nyu.FOLDER, nyu.LABELED, nyu.SPLITS])


def test_the_eigen_crop_is_the_papers_box_at_480x640_and_scales_to_small_frames():
    assert int(valid_mask(torch.ones(480, 640), 10.0, eigen_crop=True).sum()) == (471 - 45) * (601 - 41)
    small = valid_mask(torch.ones(HEIGHT, WIDTH), 10.0, eigen_crop=True)
    rows, columns = small.any(1).nonzero().ravel(), small.any(0).nonzero().ravel()
    assert (int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1) == (4, 47, 4, 60)
    assert int(valid_mask(torch.ones(1, 1), 10.0, eigen_crop=True).sum()) == 1  # never an empty box


def test_the_converted_folder_trains_through_the_bundled_nyu_config(served: FileServer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the bundled config's data.root, data/nyu_depth_v2, unchanged
    assert main(["download", "nyu-depth-v2", "--url", served.url]) == 0
    from dinov3ds.config import load_config
    from dinov3ds.training.tasks import task_for

    config = load_config("depth_nyu_linear")
    assert config.data.dataset == "nyu" and task_for(config, ["depth"]).eigen_crop
    overrides = tiny("backbone.name=vits16", "head.last_blocks=1", "output_dir=run", "trainer.max_steps=1",
                     "trainer.max_epochs=null", "trainer.val_check_interval=1", "trainer.accelerator=cpu",
                     "trainer.devices=1", "trainer.logger=[csv]", "inference.flip=false")  # fmt: skip
    code = main(["train", "--config", "depth_nyu_linear", *overrides])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "val_metrics.json").read_text())
    assert metrics["images"] == len(TEST) and np.isfinite(metrics["RMSE"])  # Eigen's test frames, scored
