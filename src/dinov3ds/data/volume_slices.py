"""Medical volumes to the backbone's RGB slices: one function (`slice_image`) at training and at inference.

Intensity by modality (`data.medical`, see config/medical.py): MRI slices are quantised to the volume's
uint16 range and z-scored, clipped and gamma-lifted per slice (as `prepare-volumes` slices are); CT slices
are clipped to a window or to the training foreground's percentile range in HU and scaled to 0-255. R, G, B
are up to three volume channels, or with `context` the slices i - c, i, i + c of one channel (2.5D).

Training reads volumes through `VolumeSlices`: each case's slices are made once, written to the cache
folder as uint8 arrays and memory-mapped, so an epoch costs no NIfTI decoding and memory does not hold
the dataset. A cache folder that cannot be written (read-only, full) is one line naming it and the fix;
a case half-written is never published (built under a private name, renamed when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinov3ds.config.medical import TRAINING_ONLY, SlicePreprocessing
from dinov3ds.data.medical import preprocess_slice, scaled_slice, zscore_range
from dinov3ds.data.nnunet import Case, NnunetDataset, load_case
from dinov3ds.data.volumes import to_uint16, uint16_range
from dinov3ds.errors import UserError

CACHE_VERSION = 1
SAMPLES_PER_CASE = 100_000  # foreground voxels drawn per case for the CT percentiles


def channel_ranges(channels: np.ndarray, options: SlicePreprocessing) -> list[tuple[float, float]]:
    """The intensity range each channel is mapped from: MRI its own min-max (to uint16, as prepare-volumes),
    CT the window or the stored training range in HU."""
    if options.modality == "mri" and options.zscore_over == "volume" and options.zscore:
        return [zscore_range(channel, options.clip) for channel in channels]
    if options.modality == "mri":
        return [uint16_range(channel) for channel in channels]
    if options.window is not None:
        level, width = options.window
        return [(level - width / 2, level + width / 2)] * len(channels)
    if options.intensity_range is None:
        raise UserError("data.medical.intensity_range is unset for CT; set data.medical.window or train on the dataset first")
    return [tuple(options.intensity_range)] * len(channels)


def slice_sources(options: SlicePreprocessing, channel_count: int) -> list[tuple[int, int]]:
    """(channel, slice offset) shown as R, G, B (as many as `options.channels`)."""
    chosen = options.input_channels or ([0] if options.context else list(range(min(channel_count, 3))))
    bad = [c for c in chosen if c >= channel_count]
    if bad:
        raise UserError(f"data.medical.input_channels names channel {bad[0]}, the volumes have {channel_count}; pick 0..{channel_count - 1}")
    if options.context:
        pairs = [(chosen[0], -options.context), (chosen[0], 0), (chosen[0], options.context)]
    else:
        pairs = [(channel, 0) for channel in chosen]
    return [pairs[i % len(pairs)] for i in range(options.channels)]


def _gray(plane: np.ndarray, low: float, high: float, options: SlicePreprocessing) -> np.ndarray:
    if options.modality == "mri" and not (options.zscore_over == "volume" and options.zscore):
        return preprocess_slice(to_uint16(plane, low, high), options.model_copy(update={"channels": 1}))[:, :, 0]
    return scaled_slice(plane, low, high, options.gamma if options.modality == "mri" else None)


def slice_image(channels: np.ndarray, ranges: Sequence[tuple[float, float]], index: int, axis: int,
                options: SlicePreprocessing) -> np.ndarray:  # fmt: skip
    """uint8 [H, W, options.channels]: slice `index` along volume `axis` of channels [C, X, Y, Z]."""
    depth = channels.shape[axis + 1]
    planes = []
    for channel, offset in slice_sources(options, len(channels)):
        position = min(max(index + offset, 0), depth - 1)  # the edge slice stands in beyond the volume
        planes.append(_gray(np.take(channels[channel], position, axis=axis), *ranges[channel], options))
    return np.stack(planes, axis=-1)


def in_plane_size(shape: Sequence[int], zooms: Sequence[float], axis: int, target: float | None) -> tuple[int, int]:
    """The slice's (height, width) after resampling to `target` mm per pixel (unchanged without a target)."""
    sides = [(n, z) for i, (n, z) in enumerate(zip(shape, zooms, strict=True)) if i != axis]
    return tuple(max(1, round(n * z / target)) if target else n for n, z in sides)


def resample(plane: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """A 2D (or H x W x C) uint8 array resized to `size`: bilinear for images, nearest for labels."""
    if tuple(plane.shape[:2]) == tuple(size):
        return plane
    tensor = torch.from_numpy(np.ascontiguousarray(plane)).float()
    tensor = tensor[None, None] if plane.ndim == 2 else tensor.permute(2, 0, 1)[None]
    mode = {"mode": "nearest-exact"} if nearest else {"mode": "bilinear", "antialias": True, "align_corners": False}
    out = F.interpolate(tensor, size=size, **mode)[0]
    out = out[0] if plane.ndim == 2 else out.permute(1, 2, 0)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def ct_intensity_range(cases: Sequence[Case], dataset: NnunetDataset, percentiles: tuple[float, float]) -> tuple[float, float]:
    """nnU-Net's CT clip range: the given percentiles of foreground voxels (label > 0) of the training cases,
    up to SAMPLES_PER_CASE per case drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    samples = []
    for case in cases:
        channels, label, _ = load_case(case, dataset)
        foreground = channels[0][label > 0] if label is not None else channels[0].ravel()
        if len(foreground) > SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
        samples.append(foreground)
    values = np.concatenate(samples) if samples else np.zeros(0)
    if not len(values):
        raise UserError(f"{dataset.root}: the training labels hold no foreground; CT needs data.medical.window")
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def _case_key(case: Case, options: SlicePreprocessing, axis: int, dataset: NnunetDataset) -> str:
    files = [p for p in (*case.images, case.label) if p is not None]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps([CACHE_VERSION, stats, options.model_dump(mode="json", exclude=set(TRAINING_ONLY)), axis, dataset.label_values])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now, so a full disk is an OSError here and not a SIGBUS (a crash
    without a message) when a page of the map is written back later."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)


def cached_case(case: Case, dataset: NnunetDataset, options: SlicePreprocessing, axis: int, cache: Path) -> Path:
    """A folder with `images.npy` (uint8 [N, H, W, C]) and `labels.npy` (uint8 [N, H, W]) of one case's slices
    along `axis`, made once and reused while the files and options are unchanged."""
    folder = cache / _case_key(case, options, axis, dataset)
    if (folder / "labels.npy").is_file():
        return folder
    channels, label, reference = load_case(case, dataset)
    if label is None:
        raise UserError(f"case {case.case_id} has no label; training needs labelsTr/{case.case_id}{dataset.file_ending}")
    ranges = channel_ranges(channels, options)
    size = in_plane_size(channels.shape[1:], reference.header.get_zooms()[:3], axis, options.target_spacing)
    depth = channels.shape[axis + 1]
    building = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        images = np.lib.format.open_memmap(building / "images.npy", "w+", np.uint8, (depth, *size, options.channels))
        labels = np.lib.format.open_memmap(building / "labels.npy", "w+", np.uint8, (depth, *size))
        _reserve(building / "images.npy"), _reserve(building / "labels.npy")
        for index in range(depth):
            images[index] = resample(slice_image(channels, ranges, index, axis, options), size, nearest=False)
            labels[index] = resample(np.take(label, index, axis=axis), size, nearest=True)
        images.flush(), labels.flush()
        del images, labels
        os.replace(building, folder)
    except OSError as error:
        shutil.rmtree(building, ignore_errors=True)
        if not (folder / "labels.npy").is_file():  # else another process finished the same case first
            raise UserError(
                f"the slice cache {cache} cannot be written ({error.strerror or error}): make it writable or free "
                "space there, or set DINOV3DS_CACHE to a folder with room for the slices"
            ) from None
    return folder


class VolumeSlices(Dataset):
    """Every slice along each of `options.axes` of the given cases, as (image, class-index mask) pairs through
    `transform` (the segmentation transforms take H x W x 3 uint8 arrays)."""

    def __init__(self, cases: Sequence[Case], dataset: NnunetDataset, options: SlicePreprocessing, transform,
                 cache: Path) -> None:  # fmt: skip
        self.transform = transform
        self.folders: list[Path] = []
        self.entries: list[tuple[int, int]] = []  # (folder number, slice index)
        for case in cases:
            for axis in options.axes:
                folder = cached_case(case, dataset, options, axis, cache)
                depth = np.load(folder / "labels.npy", mmap_mode="r").shape[0]
                self.entries += [(len(self.folders), index) for index in range(depth)]
                self.folders.append(folder)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        number, index = self.entries[item]
        if number not in self._open:  # memory maps are opened per worker process, on first use
            folder = self.folders[number]
            self._open[number] = (np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy", mmap_mode="r"))
        images, labels = self._open[number]
        return self.transform(np.array(images[index]), np.array(labels[index]))
