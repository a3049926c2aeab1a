"""NYU Depth v2's labeled release, checked and converted once into the depth_folder layout.

The official release is two MATLAB files: `nyu_depth_v2_labeled.mat` (v7.3, i.e. HDF5: 1449 RGB frames and
their in-painted depth in metres) and `splits.mat` (v5: Eigen's 795 train / 654 test indices, 1-based).
Training reads plain files, so they become `train/` and `val/` (Eigen's test split: `data.val_split` is
"val"), each with `images/NNNN.png` (lossless) and `depth/NNNN.png` (uint16 millimetres, 0 = invalid), named
by the 1-based index so any result traces back to the .mat. No MD5 is pinned (the release publishes none
we could verify), so the labeled file is checked by its exact size (in `download.py`) and both files here by
their structure before a byte is written. The 2.8 GB file is read one frame at a time; the output is written
in a private folder beside the final one and renamed into place, so a killed run leaves nothing under the
final name.

    from dinov3ds.data.nyu import convert
    folder = convert(Path("data/nyu_depth_v2_labeled.mat"), Path("data/splits.mat"), Path("data/nyu_depth_v2"), marker)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dinov3ds.errors import UserError

try:  # POSIX: one converting process per root (the kernel drops the lock with its process)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, one run at a time is the user's care
    fcntl = None  # type: ignore[assignment]

NAME = "nyu-depth-v2"
FOLDER = "nyu_depth_v2"  # what the bundled configs' data.root names (data/nyu_depth_v2)
LABELED, SPLITS = "nyu_depth_v2_labeled.mat", "splits.mat"
URLS = {  # the official places; `--url BASE` reads both names from one folder instead
    SPLITS: "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat",
    LABELED: "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat",
}
MAX_MILLIMETRES = np.iinfo(np.uint16).max  # 65.535 m: deeper values are clipped (NYU's sensor stops near 10 m)


@dataclass(frozen=True)
class Release:
    """What the official release holds; every check compares against it (tests swap in a tiny one)."""

    labeled_bytes: int = 2_972_037_809
    images: int = 1449
    height: int = 480
    width: int = 640
    train: int = 795
    test: int = 654


RELEASE = Release()


def refuse_foreign(folder: Path, marker: str) -> None:
    """Refuse a `folder` we did not finish (anything but a missing or empty real folder): it may be the
    user's, and nothing they had is overwritten. Called before downloading 2.8 GB, and again before renaming."""
    if (folder / marker).is_file() or not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir() or any(folder.iterdir()):
        raise UserError(f"{folder} exists and is not a finished dinov3ds conversion of NYU Depth v2: move it away "
                        "or delete it, then run the download again (or use --root elsewhere)")  # fmt: skip


def read_splits(path: Path, release: Release) -> tuple[np.ndarray, np.ndarray]:
    """Eigen's (train, test) 1-based indices from splits.mat, checked: the sizes, whole numbers within
    1..images, no index twice or in both; a wrong split would silently mix test frames into training."""
    from scipy.io import loadmat

    try:
        content = loadmat(path, variable_names=["trainNdxs", "testNdxs"])
    except (OSError, ValueError, NotImplementedError, TypeError) as error:
        raise UserError(f"{path} is not a readable MATLAB v5 file ({error}); delete it and run the download again") from None
    found = []
    for key, size in (("trainNdxs", release.train), ("testNdxs", release.test)):
        values = np.asarray(content.get(key, np.zeros(0)))
        if values.size != size or not np.issubdtype(values.dtype, np.number):
            raise UserError(f"{path}: {key} holds {values.size} indices, expected {size} (Eigen's split); delete "
                            "it and run the download again")  # fmt: skip
        values = values.ravel().astype(np.float64)
        if not np.all((values == np.round(values)) & (values >= 1) & (values <= release.images)):
            raise UserError(f"{path}: {key} holds indices outside 1..{release.images} (or fractional ones); delete "
                            "it and run the download again")  # fmt: skip
        found.append(values.astype(np.int64))
    train, test = found
    if len(np.unique(train)) != train.size or len(np.unique(test)) != test.size or np.intersect1d(train, test).size:
        raise UserError(f"{path}: an image index appears twice or in both trainNdxs and testNdxs; delete it and run "
                        "the download again")  # fmt: skip
    return np.sort(train), np.sort(test)


@contextlib.contextmanager
def open_labeled(path: Path, release: Release) -> Iterator[tuple[Any, Any]]:
    """The `images` and `depths` datasets of the labeled .mat, after checking names, shapes and types.

    MATLAB stores arrays column-major, so h5py sees them transposed: images (N, 3, W, H) uint8 and depths
    (N, W, H) float metres. Nothing is read here beyond the file's index; frames are read one at a time.
    """
    try:
        import h5py
    except ImportError:
        raise UserError("reading nyu_depth_v2_labeled.mat needs h5py: pip install 'dinov3ds[depth]'") from None
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path} is not a MATLAB v7.3 (HDF5) file ({error}); delete it and run the download again") from None
    with handle:
        frames = (release.images, release.width, release.height)
        expected = {"images": ((frames[0], 3, *frames[1:]), np.uint8, "uint8"), "depths": (frames, np.floating, "float")}
        for key, (shape, kind, kind_name) in expected.items():
            dataset = handle.get(key)
            if not isinstance(dataset, h5py.Dataset):
                raise UserError(f"{path} has no dataset '{key}': it is not NYU Depth v2's labeled file; delete it "
                                "and run the download again")  # fmt: skip
            if dataset.shape != shape or not np.issubdtype(dataset.dtype, kind):
                raise UserError(f"{path}: '{key}' is {dataset.dtype} {dataset.shape}, expected {kind_name} "
                                f"{shape} (MATLAB's column-major order); delete it and run the download again")  # fmt: skip
        yield handle["images"], handle["depths"]


def to_millimetres(metres: np.ndarray) -> np.ndarray:
    """uint16 millimetres, rounded: unknown (NaN, <= 0) becomes 0 = invalid, beyond 65.535 m is clipped."""
    values = np.nan_to_num(metres.astype(np.float64), nan=0.0, posinf=MAX_MILLIMETRES / 1000, neginf=0.0)
    return np.clip(np.rint(values * 1000), 0, MAX_MILLIMETRES).astype(np.uint16)


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """`.<folder>.converting` beside `folder`, held by this process alone and emptied first (a killed run's
    leftovers); removed on the way out unless it was renamed into place."""
    staging = folder.with_name(f".{folder.name}.converting")
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise UserError(f"{staging} is not a folder dinov3ds made: delete it, then run the download again")
    staging.mkdir(exist_ok=True)
    identity = os.stat(staging)
    descriptor = os.open(staging, os.O_RDONLY) if fcntl is not None else None
    try:
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another dinov3ds download is converting into {staging}; wait for it to finish") from None
        for entry in staging.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        yield staging
    finally:
        with contextlib.suppress(FileNotFoundError):  # still ours (not renamed, not another run's): remove
            if os.path.samestat(identity, os.lstat(staging)):
                shutil.rmtree(staging, ignore_errors=True)
        if descriptor is not None:
            os.close(descriptor)


def _write_frame(images: Any, depths: Any, index: int, split: Path) -> None:
    """Frame `index` (1-based) as split/images/NNNN.png (RGB) and split/depth/NNNN.png (uint16 mm)."""
    rgb = np.ascontiguousarray(images[index - 1].transpose(2, 1, 0))  # (3, W, H) -> (H, W, 3)
    depth = to_millimetres(np.asarray(depths[index - 1]).T)  # (W, H) -> (H, W)
    Image.fromarray(rgb, "RGB").save(split / "images" / f"{index:04d}.png")
    Image.fromarray(depth).save(split / "depth" / f"{index:04d}.png")


def convert(labeled: Path, splits: Path, folder: Path, marker: str, *, progress: bool = True) -> Path:
    """Write `folder` (train/ = Eigen's train, val/ = Eigen's test) from the two checked files; return it.

    `marker` is written last inside the private folder, so the renamed folder is complete by construction;
    a second call finds it and does nothing.
    """
    release = RELEASE
    train, test = read_splits(splits, release)
    with open_labeled(labeled, release) as (images, depths), _staging(folder) as staging:
        if (folder / marker).is_file():  # another run finished while this one waited
            return folder
        refuse_foreign(folder, marker)
        work = [(staging / "train", index) for index in train] + [(staging / "val", index) for index in test]
        for split in (staging / "train", staging / "val"):
            (split / "images").mkdir(parents=True)
            (split / "depth").mkdir()
        for split, index in tqdm(work, desc=f"converting {labeled.name}", unit="frame", disable=not progress):
            try:
                _write_frame(images, depths, int(index), split)
            except OSError as error:  # a damaged HDF5 chunk, or a full disk
                raise UserError(f"converting frame {index} of {labeled} into {staging} failed ({error}); free disk "
                                "space if that is the reason, else delete the .mat and run the download again") from None
        (staging / marker).write_text(f"{NAME} {labeled.stat().st_size} bytes, Eigen split {train.size}/{test.size}\n")
        if folder.is_dir() and not folder.is_symlink():
            folder.rmdir()  # empty (refuse_foreign checked): os.replace cannot replace a folder on every system
        os.replace(staging, folder)
    return folder
