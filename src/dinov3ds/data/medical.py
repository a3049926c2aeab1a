"""Medical slices: the one MRI intensity preprocessing, and NIfTI volumes cut into slice folders.

`preprocess_slice` is the only place where MRI intensities become network input. Training reads slices
through `load_mri_slice` and volume inference (`dinov3ds.models.volume_inference.predict_volume`) calls the same function on
the same uint16 quantisation, so a model never sees different arrays at training and inference time.

`prepare_volumes` turns NIfTI image/label pairs into the segmentation-folder layout
(`images/<split>/<volume>/<volume>_<index>.png`, masks at the same path under `annotations/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.data.volumes import (
    check_same_grid,
    integer_labels,
    load_volume,
    pair_volumes,
    volume_stem,
    volume_to_uint16,
)
from dinov3ds.errors import UserError

SPLITS = ("train", "val", "test")


def preprocess_slice(
    slice2d: np.ndarray, options: SlicePreprocessing, *, source: str = "slice"
) -> np.ndarray:
    """Turn one 2D slice of any numeric dtype into uint8 [H, W, channels].

    Float64 throughout so uint16 and float inputs give the same result up to the final rounding.
    `source` names the file in the error raised for NaN/Inf values.
    """
    if slice2d.ndim != 2:
        raise ValueError(f"preprocess_slice expects a 2D slice, got shape {slice2d.shape}")
    x = np.asarray(slice2d, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise UserError(f"{source}: slice contains {bad} NaN/Inf values; fix the scan or drop this slice")
    if options.zscore:
        std = x.std()
        x = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    if options.clip is not None:
        x = np.clip(x, -options.clip, options.clip)
        low, high = -options.clip, options.clip
    else:
        low, high = float(x.min()), float(x.max())
    x = (x - low) * (255.0 / (high - low)) if high > low else np.zeros_like(x)
    if options.gamma is not None:
        x = 255.0 * (x / 255.0) ** options.gamma
    gray = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], options.channels, axis=2)


def scaled_slice(plane: np.ndarray, low: float, high: float, gamma: float | None = None) -> np.ndarray:
    """uint8 [H, W]: `plane` clipped to [low, high] and mapped linearly to 0-255, then gamma-lifted. CT windows
    and nnU-Net's per-volume z-score (whose clipped range is `zscore_range`) both come through here."""
    scaled = (np.clip(plane.astype(np.float64), low, high) - low) * (255.0 / (high - low)) if high > low \
        else np.zeros(plane.shape)  # fmt: skip
    if gamma is not None:
        scaled = 255.0 * (scaled / 255.0) ** gamma
    return np.rint(scaled).astype(np.uint8)


def zscore_range(volume: np.ndarray, clip: float | None, *, source: str = "volume") -> tuple[float, float]:
    """nnU-Net's per-image z-score as the intensity range mapped to 0-255: mean +- clip x std of the whole volume
    (its min and max without a clip). A z-score is affine, so clipping it to +-clip and rescaling is mapping
    this range: every slice of a scan shares one mapping, unlike the per-slice z-score."""
    mean, std = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise UserError(f"{source}: volume contains NaN/Inf voxels; fix the scan before use")
    if clip is None or std == 0:
        return float(np.min(volume)), float(np.max(volume))
    return mean - clip * std, mean + clip * std


def load_mri_slice(path: Path, options: SlicePreprocessing) -> np.ndarray:
    """Read a grayscale PNG slice (16-bit from `prepare_volumes`, or 8-bit) and preprocess it.

    Meant as the `image_loader` of the segmentation-folder dataset (bind `options` with functools.partial).
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
                image = image.convert("L")
            pixels = np.asarray(image)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(
            f"{path}: cannot read the image ({error}); re-create it with prepare-volumes"
        ) from error
    return preprocess_slice(pixels, options, source=str(path))


def split_volumes(
    names: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded split by volume: a volume's slices never land in two splits; train keeps at least one."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
            "and their sum below 1"
        )
    total = len(names)

    def count(fraction: float) -> int:
        # A non-zero fraction asks for a split: give it at least one volume.
        return max(1, round(fraction * total)) if fraction > 0 else 0

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n_val + n_test >= total:
        raise UserError(
            f"{total} volume(s) are too few for val_fraction={val_fraction}, test_fraction={test_fraction}: "
            "at least one must stay in train; add volumes or lower the fractions"
        )
    order = np.random.default_rng(seed).permutation(total)
    shuffled = [sorted(names)[i] for i in order]
    return {
        "train": sorted(shuffled[n_val + n_test :]),
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
    }


def explicit_split(names: list[str], assigned: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """Splits the user named (`val` / `test` lists of volume names, with or without .nii[.gz]); every other
    volume is train. A name that is no volume, or is given twice, is an error naming it."""
    split_of: dict[str, str] = {}
    for split, wanted in assigned.items():
        for raw in wanted:
            name = volume_stem(Path(raw.strip()))
            if name not in names:
                raise UserError(f"{source}: {raw!r} is not one of the volumes ({', '.join(sorted(names)[:5])}...)")
            if name in split_of:
                raise UserError(f"{source}: {name!r} is listed for both {split_of[name]} and {split}; list it once")
            split_of[name] = split
    if len(split_of) == len(names):
        raise UserError(f"{source}: every volume is in val or test; leave at least one for train")
    return {split: sorted(n for n in names if split_of.get(n, "train") == split) for split in SPLITS}


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """`name,split` rows (a header row is allowed), split one of train/val/test."""
    assigned: dict[str, list[str]] = {"val": [], "test": []}
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read split file {path}: {error}") from None
    for number, line in enumerate(lines, start=1):
        cells = [cell.strip() for cell in line.split(",")]
        if not line.strip() or (number == 1 and cells[:2] == ["name", "split"]):
            continue
        if len(cells) != 2 or cells[1] not in SPLITS:
            raise UserError(f"{path}, line {number}: expected 'name,split' with split train, val or test; got {line!r}")
        if cells[1] != "train":
            assigned[cells[1]].append(cells[0])
    return assigned


def label_ids(data: np.ndarray, label_map: dict[int, int] | None, source: Path) -> np.ndarray:
    """Integer label ids as uint8 (the annotation PNGs are 8-bit), after an optional remapping; a fractional
    value is refused, naming the first one and its voxel."""
    ids = integer_labels(data, source)
    if label_map:
        mapped = ids.copy()
        for old, new in label_map.items():
            mapped[ids == old] = new
        ids = mapped
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise UserError(
            f"{source}: label ids span {ids.min()}..{ids.max()}, outside 0..255; remap them with label_map"
        )
    return ids.astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a 2D uint8 or uint16 array as a grayscale PNG (mode L or I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _check_no_split_empties(pairs: list[tuple[Path, Path]], split_of_name: dict[str, str], axis: int,
                            label_map: dict[int, int] | None) -> None:  # fmt: skip
    """With skip_empty, a split whose volumes' labels are all background would end with no slices: said before
    any file is written (the labels are read twice, the scans once)."""
    kept = dict.fromkeys(split_of_name.values(), 0)
    for image_path, label_path in pairs:
        ids = label_ids(np.asanyarray(load_volume(label_path).dataobj), label_map, label_path)
        in_plane = tuple(a for a in range(3) if a != axis)
        kept[split_of_name[volume_stem(image_path)]] += int(np.count_nonzero(ids.any(axis=in_plane)))
    empty = [split for split, count in kept.items() if count == 0]
    if empty:
        raise UserError(f"--skip-empty would leave split {empty[0]} with no slices (its labels are all background); "
                        "drop --skip-empty or put volumes with labelled structures in it")  # fmt: skip


def prepare_volumes(
    images_dir: Path,
    labels_dir: Path,
    out_dir: Path,
    *,
    axis: int = 2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    skip_empty: bool = False,
    seed: int = 0,
    label_map: dict[int, int] | None = None,
    splits: dict[str, list[str]] | None = None,
) -> dict:
    """Slice NIfTI image/label pairs into a segmentation folder and record the split in `volumes.json`.

    Pairing: the label of `images_dir/<name>.nii[.gz]` is `labels_dir/<name>{,_seg,_label,_mask}.nii[.gz]`.
    Slice `i` along `axis` goes to `images/<split>/<name>/<name>_<i:04d>.png` (16-bit, per-volume min-max)
    and `annotations/<split>/<name>/<name>_<i:04d>.png` (8-bit label ids). `skip_empty` drops slices whose
    label is all zero. `splits` ({"val": [...], "test": [...]}, names of volumes) replaces the seeded split.
    Returns the summary written to `out_dir/volumes.json`.
    """
    images_dir, labels_dir, out_dir = Path(images_dir), Path(labels_dir), Path(out_dir)
    if axis not in (0, 1, 2):
        raise UserError(f"axis={axis}: must be 0, 1 or 2 (the volume axis to slice along)")
    if any((out_dir / sub).exists() and any((out_dir / sub).iterdir()) for sub in ("images", "annotations")):
        raise UserError(f"{out_dir}: already holds prepared slices; choose a new out_dir or delete it first")
    pairs = pair_volumes(images_dir, labels_dir)
    names = [volume_stem(p) for p, _ in pairs]
    chosen = explicit_split(names, splits, "--val/--test/--splits") if splits else split_volumes(
        names, val_fraction, test_fraction, seed
    )  # fmt: skip
    split_of_name = {name: split for split, members in chosen.items() for name in members}
    if skip_empty:
        _check_no_split_empties(pairs, split_of_name, axis, label_map)
    records = []
    for image_path, label_path in pairs:
        name = volume_stem(image_path)
        image_file, label_file = load_volume(image_path), load_volume(label_path)
        image, label = np.asanyarray(image_file.dataobj), np.asanyarray(label_file.dataobj)
        if image.shape != label.shape:
            raise UserError(
                f"{image_path} has shape {image.shape} but its label {label_path} has shape {label.shape}; "
                "resample the label onto the image grid"
            )
        check_same_grid(label_path, label_file, image_path, image_file)
        intensity = volume_to_uint16(image, source=str(image_path))
        ids = label_ids(label, label_map, label_path)
        split = split_of_name[name]
        written = 0
        for index in range(image.shape[axis]):
            label_slice = np.take(ids, index, axis=axis)
            if skip_empty and not label_slice.any():
                continue
            file_name = f"{name}/{name}_{index:04d}.png"
            save_png(np.take(intensity, index, axis=axis), out_dir / "images" / split / file_name)
            save_png(label_slice, out_dir / "annotations" / split / file_name)
            written += 1
        records.append(
            {
                "name": name,
                "image": str(image_path),
                "label": str(label_path),
                "split": split,
                "shape": list(image.shape),
                "spacing": [float(z) for z in image_file.header.get_zooms()[:3]],
                "intensity_range": [float(image.min()), float(image.max())],
                "slices": int(image.shape[axis]),
                "written": written,
            }
        )
    summary = {
        "axis": axis,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "skip_empty": skip_empty,
        "label_map": {str(k): v for k, v in (label_map or {}).items()},
        "splits": {split: sorted(r["name"] for r in records if r["split"] == split) for split in SPLITS},
        "slices": {split: sum(r["written"] for r in records if r["split"] == split) for split in SPLITS},
        "volumes": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / "volumes.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, out_dir / "volumes.json")
    return summary
