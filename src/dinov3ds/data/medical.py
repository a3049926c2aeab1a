"""Medical slices: one intensity preprocessing for training and volume inference, and NIfTI → slice folders.

`preprocess_slice` is the only place where MRI intensities become network input. Training reads slices
through `load_mri_slice` and volume inference (`dinov3ds.volumes.predict_volume`) calls the same function on
the same uint16 quantisation, so a model never sees different arrays at training and inference time.

`prepare_volumes` turns NIfTI image/label pairs into the segmentation-folder layout
(`images/<split>/<volume>/<volume>_<index>.png`, masks at the same path under `annotations/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinov3ds.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# A label volume matches an image volume with the same stem, optionally followed by one of these.
LABEL_SUFFIXES = ("", "_seg", "_label", "_mask")
SPLITS = ("train", "val", "test")
UINT16_MAX = 65535


class SlicePreprocessing(BaseModel):
    """How a 2D MRI slice becomes a uint8 image (DESIGN §6); the same options at training and inference."""

    model_config = ConfigDict(extra="forbid")

    zscore: bool = True  # standardise each slice to mean 0, std 1 (a constant slice becomes all zeros)
    clip: float | None = Field(2.0, gt=0)  # clip z-scores to [-clip, clip]; None keeps the full range
    gamma: float | None = Field(0.75, gt=0)  # out = 255 * (x / 255) ** gamma; < 1 lifts low intensities
    channels: int = Field(3, ge=1)  # gray value repeated to this many channels (3 for RGB backbones)

    @model_validator(mode="after")
    def _clip_needs_zscore(self) -> SlicePreprocessing:
        # `clip` is measured in standard deviations; on raw intensities it would flatten the image.
        if self.clip is not None and not self.zscore:
            raise ValueError("clip is in standard deviations and needs zscore: true; set clip: null")
        return self


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


def volume_stem(path: Path) -> str:
    """File name without .nii / .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_volume(path: Path, *, expect_3d: bool = True) -> nib.Nifti1Image:
    """Load a NIfTI image with its data in memory, checked: 3D (a trailing 4th dim of 1 is squeezed), finite.

    The data is read once here (the NaN check needs it) and kept, so callers do not read the file twice.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise UserError(
            f"{path}: not a readable NIfTI file ({error}); convert it to .nii/.nii.gz (e.g. with dcm2niix)"
        ) from error
    if expect_3d:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise UserError(
                f"{path}: expected a 3D volume, got shape {data.shape}; "
                "pass one 3D volume per file (split 4D series into single volumes)"
            )
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise UserError(
                f"{path}: contains {bad} NaN/Inf voxels; fix the scan or replace them (e.g. with 0) before use"
            )
    return type(image)(data, image.affine, image.header)


def uint16_range(volume: np.ndarray, *, source: str = "volume") -> tuple[float, float]:
    """The (min, max) that `to_uint16` maps to 0..65535; computed without copying the volume."""
    low, high = float(np.min(volume)), float(np.max(volume))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UserError(f"{source}: volume contains NaN/Inf voxels; fix the scan before use")
    return low, high


def to_uint16(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..65535; the one formula used for slice PNGs and volume inference."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint16)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (UINT16_MAX / (high - low))
    return np.clip(np.rint(scaled), 0, UINT16_MAX).astype(np.uint16)


def volume_to_uint16(volume: np.ndarray, *, source: str = "volume") -> np.ndarray:
    """Per-volume min-max map to uint16.

    Slice PNGs are 16-bit, so this keeps 65,536 levels (more than MRI scanners resolve). The map is
    affine, and per-slice z-scoring in `preprocess_slice` cancels any affine map, so the choice of range
    does not change what the model sees beyond rounding.
    """
    return to_uint16(volume, *uint16_range(volume, source=source))


def iter_nifti(folder: Path) -> list[Path]:
    """The .nii/.nii.gz files directly inside `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def pair_volumes(images_dir: Path, labels_dir: Path) -> list[tuple[Path, Path]]:
    """Match each image volume to its label volume by name (see LABEL_SUFFIXES).

    Images and labels may share one folder (BraTS style `case.nii.gz` + `case_seg.nii.gz`): a file that is
    another file's label is not itself an image.
    """
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found; pass the folder holding the .nii/.nii.gz volumes")
    images = iter_nifti(images_dir)
    if not images:
        raise UserError(f"{images_dir}: no .nii/.nii.gz volumes found; point images_dir at the scans")
    labels = {p.name: p for p in iter_nifti(labels_dir)}
    matches: dict[Path, Path] = {}
    for image in images:
        stem = volume_stem(image)
        candidates = [
            labels[stem + suffix + ext]
            for suffix in LABEL_SUFFIXES
            for ext in NIFTI_SUFFIXES
            if stem + suffix + ext in labels and labels[stem + suffix + ext] != image
        ]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise UserError(f"{image}: several label volumes match ({names}); keep exactly one")
        if candidates:
            matches[image] = candidates[0]
    used_as_labels = set(matches.values())
    images = [p for p in images if p not in used_as_labels]
    stems = [volume_stem(p) for p in images]
    for image, stem in zip(images, stems, strict=True):
        if stems.count(stem) > 1:
            raise UserError(f"{image}: another volume in {images_dir} has the name {stem!r}; rename one")
        if image not in matches:
            tried = ", ".join(stem + s + ".nii[.gz]" for s in LABEL_SUFFIXES)
            raise UserError(
                f"{image}: no label volume in {labels_dir} (looked for {tried}); add or rename it"
            )
    return [(image, matches[image]) for image in images]


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


def label_ids(data: np.ndarray, label_map: dict[int, int] | None, source: Path) -> np.ndarray:
    """Integer label ids as uint8 (the annotation PNGs are 8-bit), after an optional remapping."""
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise UserError(
                f"{source}: label volume holds non-integer values; save it with integer label ids"
            )
        data = rounded
    ids = data.astype(np.int64)
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
) -> dict:
    """Slice NIfTI image/label pairs into a segmentation folder and record the split in `volumes.json`.

    Pairing: the label of `images_dir/<name>.nii[.gz]` is `labels_dir/<name>{,_seg,_label,_mask}.nii[.gz]`.
    Slice `i` along `axis` goes to `images/<split>/<name>/<name>_<i:04d>.png` (16-bit, per-volume min-max)
    and `annotations/<split>/<name>/<name>_<i:04d>.png` (8-bit label ids). `skip_empty` drops slices whose
    label is all zero. Returns the summary written to `out_dir/volumes.json`.
    """
    images_dir, labels_dir, out_dir = Path(images_dir), Path(labels_dir), Path(out_dir)
    if axis not in (0, 1, 2):
        raise UserError(f"axis={axis}: must be 0, 1 or 2 (the volume axis to slice along)")
    if any((out_dir / sub).exists() and any((out_dir / sub).iterdir()) for sub in ("images", "annotations")):
        raise UserError(f"{out_dir}: already holds prepared slices; choose a new out_dir or delete it first")
    pairs = pair_volumes(images_dir, labels_dir)
    split_of_name = {
        name: split
        for split, names in split_volumes(
            [volume_stem(p) for p, _ in pairs], val_fraction, test_fraction, seed
        ).items()
        for name in names
    }
    records = []
    for image_path, label_path in pairs:
        name = volume_stem(image_path)
        image = np.asanyarray(load_volume(image_path).dataobj)
        label = np.asanyarray(load_volume(label_path).dataobj)
        if image.shape != label.shape:
            raise UserError(
                f"{image_path} has shape {image.shape} but its label {label_path} has shape {label.shape}; "
                "resample the label onto the image grid"
            )
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
