"""The dataset fingerprint: what self-configuration knows about a medical dataset, computed once and cached.

As nnU-Net's DatasetFingerprintExtractor, over the training cases: each case's voxel spacing and shape, and
per channel a sample of its foreground's intensities (voxels labelled > 0) pooled into percentiles 0.5 / 50 /
99.5, mean and std; with what nnU-Net reads beside it: each channel's modality (dataset.json's channel name:
"CT" is CT, anything else is z-scored as MRI) and the classes' voxel frequencies. Added for the per-volume
z-score's clip: the foreground's percentiles after each case's own z-score.

Slice folders that `prepare-volumes` wrote (recognised by its `volumes.json`) are fingerprinted from that
record (shapes, spacings, slicing axis) and their training PNGs (16-bit intensities, class pixels).

The result is cached as JSON in `<cache>/fingerprints/` (DINOV3DS_CACHE, else ~/.cache/dinov3ds), keyed by the
cases' files (path, size, modification time): a second run, `check-data` and `eval` read it back at no cost.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dinov3ds.data.nnunet import IGNORE_CLASS, Case, NnunetDataset, load_case
from dinov3ds.errors import UserError

VERSION = 1
SAMPLES_PER_CASE = 100_000  # foreground voxels kept per case and channel (all of them when fewer)
PERCENTILES = (0.5, 50.0, 99.5)
MAX_SLICES = 400  # slice folders: training slices read for intensities and class pixels (evenly spread)


@dataclass
class ChannelStats:
    """One input channel's foreground intensities (the units of its files)."""

    name: str
    modality: str  # "ct" (Hounsfield units) or "mri" (arbitrary units: z-scored)
    percentile_00_5: float | None
    median: float | None
    percentile_99_5: float | None
    mean: float | None
    std: float | None
    zscored_00_5: float | None = None  # the same percentiles after each case's own volume z-score
    zscored_99_5: float | None = None


@dataclass
class Fingerprint:
    kind: str  # "nnunet" (volumes) or "slices" (a prepare-volumes folder)
    cases: int
    channels: list[ChannelStats]
    shapes: list[list[int]]  # per case, voxels along each volume axis
    spacings: list[list[float]] | None  # per case, mm per voxel along each axis (None: not recorded)
    class_voxels: dict[str, float]  # share of the labelled voxels per class
    slice_axis: int | None = None  # slices: the axis prepare-volumes sliced along

    @classmethod
    def from_json(cls, payload: dict) -> Fingerprint:
        return cls(**{**payload, "channels": [ChannelStats(**c) for c in payload["channels"]]})


def spread(values: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Median, min and max per axis of per-case values (shapes or spacings)."""
    array = np.asarray(values, dtype=np.float64)
    return {"median": np.median(array, 0).tolist(), "min": array.min(0).tolist(), "max": array.max(0).tolist()}


def _stats(name: str, modality: str, samples: np.ndarray, zscored: np.ndarray | None) -> ChannelStats:
    if not len(samples):
        return ChannelStats(name, modality, None, None, None, None, None)
    low, median, high = (float(v) for v in np.percentile(samples, PERCENTILES))
    z_low, z_high = (float(v) for v in np.percentile(zscored, (0.5, 99.5))) if zscored is not None and len(zscored) else (None, None)
    return ChannelStats(name, modality, low, median, high, float(samples.mean()), float(samples.std()), z_low, z_high)


def _class_shares(counts: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    total = counts.sum()
    return {name: float(counts[i] / total) if total else 0.0 for i, name in enumerate(names)}


def _key(kind: str, files: Iterable[Path], extra: object) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([VERSION, kind, stats, extra]).encode()).hexdigest()[:32]


def _cached(cache: Path, key: str, compute) -> Fingerprint:
    path = cache / "fingerprints" / f"{key}.json"
    try:
        return Fingerprint.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or unreadable: computed again
    fingerprint = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(asdict(fingerprint), indent=1))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache costs a recomputation next time, nothing else
    return fingerprint


def nnunet_fingerprint(dataset: NnunetDataset, cases: Sequence[Case], cache: Path) -> Fingerprint:
    """The fingerprint of `cases` (the training cases of the fold), from the cache when their files are unchanged."""
    files = [p for case in cases for p in (*case.images, case.label) if p is not None]
    key = _key("nnunet", files, [dataset.channel_names, dataset.label_values, dataset.ignore_value])
    return _cached(cache, key, lambda: _measure_nnunet(dataset, cases))


def _measure_nnunet(dataset: NnunetDataset, cases: Sequence[Case]) -> Fingerprint:
    # One generator per channel, seeded 0: channel 0 draws what data/volume_slices.ct_intensity_range draws.
    generators = [np.random.default_rng(0) for _ in dataset.channel_names]
    samples: list[list[np.ndarray]] = [[] for _ in dataset.channel_names]
    zscored: list[list[np.ndarray]] = [[] for _ in dataset.channel_names]
    counts = np.zeros(len(dataset.class_names), dtype=np.int64)
    shapes, spacings = [], []
    for case in cases:
        channels, label, reference = load_case(case, dataset)  # training cases always have their label
        shapes.append([int(n) for n in channels.shape[1:]])
        spacings.append([float(z) for z in reference.header.get_zooms()[:3]])
        labelled = label != IGNORE_CLASS
        foreground = (label > 0) & labelled
        counts += np.bincount(label[labelled].ravel(), minlength=len(counts))
        for number, channel in enumerate(channels):
            values = channel[foreground]
            if len(values) > SAMPLES_PER_CASE:
                values = generators[number].choice(values, SAMPLES_PER_CASE, replace=False)
            std = float(channel.std(dtype=np.float64))
            samples[number].append(values)
            zscored[number].append((values - float(channel.mean(dtype=np.float64))) / std if std > 0 else np.zeros(len(values)))
    channels_stats = [
        _stats(name, "ct" if name.strip().upper() == "CT" else "mri", np.concatenate(samples[i]), np.concatenate(zscored[i]))
        for i, name in enumerate(dataset.channel_names)
    ]
    return Fingerprint("nnunet", len(cases), channels_stats, shapes, spacings, _class_shares(counts, dataset.class_names))


def slice_folder_fingerprint(root: Path, image_folder: Path, pairs: Sequence[tuple[Path, Path]], labels,
                             class_names: Sequence[str], cache: Path) -> Fingerprint:  # fmt: skip
    """A prepare-volumes folder: shapes, spacings and axis from `volumes.json`, intensities (16-bit units) and class
    pixels from up to MAX_SLICES of the training pairs. `labels` turns a mask into class ids (data/layout.py)."""
    record_path = root / "volumes.json"
    chosen = [pairs[i] for i in np.unique(np.linspace(0, len(pairs) - 1, min(MAX_SLICES, len(pairs))).astype(int))] if pairs else []
    key = _key("slices", [record_path, *(p for pair in chosen for p in pair)], list(class_names))
    return _cached(cache, key, lambda: _measure_slices(record_path, image_folder, chosen, labels, class_names))


def _measure_slices(record_path: Path, image_folder: Path, pairs, labels, class_names: Sequence[str]) -> Fingerprint:
    from dinov3ds.data.io import load_mask

    try:
        record = json.loads(record_path.read_text())
        axis, volumes = int(record["axis"]), record["volumes"]
        training = [volume for volume in volumes if volume["split"] == image_folder.name] or volumes
        shapes = [[int(n) for n in volume["shape"]] for volume in training]
        spacings = [[float(z) for z in volume["spacing"]] for volume in training if "spacing" in volume] or None
        if axis not in (0, 1, 2) or not shapes or any(len(shape) != 3 for shape in shapes):
            raise ValueError("no volumes, or an axis or a shape that is not 3D")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{record_path} is not prepare-volumes's record ({error}); write the folder again with prepare-volumes") from None
    counts = np.zeros(len(class_names), dtype=np.int64)
    values = []
    for image_path, mask_path in pairs:
        ids = labels.prepare(load_mask(mask_path), mask_path)
        counts += np.bincount(ids[ids < len(class_names)].ravel(), minlength=len(counts))[: len(counts)]
        pixels = _gray_pixels(image_path)
        if pixels.shape == ids.shape:
            values.append(pixels[(ids > 0) & (ids < len(class_names))])
    samples = np.concatenate(values) if values else np.zeros(0)
    channel = _stats("slice", "mri", samples, None)
    return Fingerprint("slices", len(training), [channel], shapes, spacings, _class_shares(counts, class_names), slice_axis=axis)


def _gray_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image if image.mode.startswith("I") or image.mode == "L" else image.convert("L"), dtype=np.float64)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_fingerprint(fingerprint: Fingerprint) -> list[str]:
    """The fingerprint as the lines `check-data` and the run log print."""
    what = "training cases" if fingerprint.kind == "nnunet" else "training volumes (prepare-volumes slices)"
    lines = [f"dataset fingerprint ({fingerprint.cases} {what}):"]
    for key, values in (("spacing mm", fingerprint.spacings), ("shape", fingerprint.shapes)):
        if values:
            summary = spread(values)
            shown = ", ".join(f"{name} {' x '.join(f'{v:g}' for v in summary[name])}" for name in ("median", "min", "max"))
            lines.append(f"  {key:<11} {shown}")
    if fingerprint.slice_axis is not None:
        lines.append(f"  sliced along axis {fingerprint.slice_axis}")
    for number, channel in enumerate(fingerprint.channels):
        lines.append(f"  channel {number} {channel.name} ({channel.modality.upper()}): foreground p0.5 "
                     f"{_number(channel.percentile_00_5)}, p50 {_number(channel.median)}, p99.5 "
                     f"{_number(channel.percentile_99_5)}, mean {_number(channel.mean)}, std {_number(channel.std)}")  # fmt: skip
    shares = ", ".join(f"{name} {100 * share:.2f} %" for name, share in fingerprint.class_voxels.items())
    lines.append(f"  class voxels: {shares}")
    return lines
