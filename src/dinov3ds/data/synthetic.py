"""Small synthetic datasets on disk, in the real datasets' layouts, for tests and the offline demo.

Every image comes from its own generator seeded by (seed, split, index), so a seed reproduces the same
bytes whatever else is generated. Classes are learnable but not trivial: colour and texture both carry
the class, with jitter and noise on top.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from dinov3ds.data.classification import IMAGENETTE_CLASSES
from dinov3ds.errors import UserError

_TEXTURES = ("stripes", "checker", "dots")


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _texture(kind: str, shape: tuple[int, int], frequency: float, angle: float, phase: float) -> np.ndarray:
    """A [0, 1] pattern of `frequency` cycles per image side, rotated by `angle`."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    u = frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase
    v = frequency * (-x * np.sin(angle) + y * np.cos(angle)) + phase
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * u)
    if kind == "checker":
        return (np.sin(2 * np.pi * u) * np.sin(2 * np.pi * v) > 0).astype(np.float64)
    distance = (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2
    return np.exp(-distance / (2 * 0.15**2))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)


def _classification_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class = hue + texture kind + frequency + orientation; each image jitters all of them."""
    hue = label / num_classes + rng.uniform(-0.03, 0.03)
    kind = _TEXTURES[label % len(_TEXTURES)]
    frequency = (3 + 2 * (label % 4)) * rng.uniform(0.8, 1.25)
    angle = np.pi * label / num_classes + rng.uniform(-0.15, 0.15)
    pattern = _texture(kind, (size, size), frequency, angle, rng.uniform())[..., None]
    foreground = _rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.7, 1.0))
    background = _rgb(hue, rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.45))
    pixels = background * (1 - pattern) + foreground * pattern
    return _to_uint8(pixels + rng.normal(0, 0.06, pixels.shape))


def make_classification_folder(
    root: str | Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 12,
    val_per_class: int = 6,
    size: int = 64,
    seed: int = 0,
    class_folder_names: list[str] | None = None,
) -> Path:
    """Write an ImageNette-shaped tree `root/{train,val}/<class>/*.JPEG` (JPEG quality 95); returns root.

    Folder names default to the ImageNette wnids when there are 10 classes, else class_00, class_01, ...
    """
    root = Path(root)
    if class_folder_names is None:
        wnids = list(IMAGENETTE_CLASSES)
        class_folder_names = (
            wnids if num_classes == len(wnids) else [f"class_{i:02d}" for i in range(num_classes)]
        )
    if len(class_folder_names) != num_classes:
        raise UserError(
            f"class_folder_names has {len(class_folder_names)} names for {num_classes} classes; give one per class"
        )
    for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(class_folder_names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                rng = np.random.default_rng([seed, split_index, label, index])
                pixels = _classification_image(label, num_classes, size, rng)
                Image.fromarray(pixels).save(folder / f"{name}_{index:05d}.JPEG", quality=95)
    return root


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: tuple[int, int], label: int, rng: np.random.Generator
) -> None:
    """One circle, rectangle or triangle of 15-40% of the shorter side, filled with `label`."""
    height, width = shape
    radius = rng.uniform(0.15, 0.4) * min(height, width) / 2 + 1
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=label)
    elif kind == 1:
        aspect = rng.uniform(0.5, 2.0)
        draw.rectangle(
            [cx - radius * aspect, cy - radius / aspect, cx + radius * aspect, cy + radius / aspect],
            fill=label,
        )
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=label)


def _segmentation_pair(
    num_classes: int, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """1-3 shapes of per-class colour (hue k / (K-1)) on a grey-ish, striped, noisy background (class 0)."""
    mask_image = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(mask_image)
    for _ in range(rng.integers(1, 4)):
        _draw_shape(draw, shape, int(rng.integers(1, num_classes)), rng)
    mask = np.asarray(mask_image)

    texture = _texture("stripes", shape, rng.uniform(2, 6), rng.uniform(0, np.pi), rng.uniform())[..., None]
    base = _rgb(rng.uniform(), rng.uniform(0.05, 0.2), rng.uniform(0.35, 0.55))
    pixels = base * (0.8 + 0.4 * texture)
    for label in range(1, num_classes):
        colour = _rgb((label - 1) / (num_classes - 1) + rng.uniform(-0.02, 0.02), 0.85, rng.uniform(0.8, 1.0))
        pixels[mask == label] = colour * (0.9 + 0.1 * texture[mask == label])
    return _to_uint8(pixels + rng.normal(0, 0.04, pixels.shape)), mask


def make_segmentation_folder(
    root: str | Path,
    *,
    layout: Literal["folder", "ade20k"] = "folder",
    num_classes: int = 3,
    train: int = 16,
    val: int = 6,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> Path:
    """Write a segmentation dataset and return the root a dataset class takes.

    `num_classes` counts the background (class 0); `size` is (height, width); masks are 8-bit L PNGs.
    layout="folder": `root/{images,annotations}/{train,val}/img_NNNNNNNN.png`, ids 0..K-1; returns root.
    layout="ade20k": `root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.jpg|png`
    with ids stored +1 (0 = "other", unused) so reduce_zero_label recovers 0..K-1; returns the
    ADEChallengeData2016 folder.
    """
    if not 2 <= num_classes <= 255:
        raise UserError(
            f"num_classes={num_classes} for a synthetic segmentation set; use 2 (background + 1) to 255"
        )
    if layout == "folder":
        base, splits, offset, image_ext = Path(root), {"train": "img", "val": "img"}, 0, ".png"
    elif layout == "ade20k":
        base, offset, image_ext = Path(root) / "ADEChallengeData2016", 1, ".jpg"
        splits = {"training": "ADE_train", "validation": "ADE_val"}
    else:
        raise UserError(f"unknown synthetic layout {layout!r}; use 'folder' or 'ade20k'")
    for split_index, (split, count) in enumerate(zip(splits, (train, val), strict=True)):
        image_dir, mask_dir = base / "images" / split, base / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            stem = f"{splits[split]}_{index + offset:08d}"  # ADE numbers files from 1, as its ids
            rng = np.random.default_rng([seed, split_index, index])
            pixels, mask = _segmentation_pair(num_classes, size, rng)
            Image.fromarray(pixels).save(image_dir / f"{stem}{image_ext}", quality=95)
            Image.fromarray((mask + offset).astype(np.uint8)).save(mask_dir / f"{stem}.png")
    return base


def make_head_phantom(
    shape: tuple[int, int, int] = (40, 48, 32),
    *,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A synthetic T1-like head and its mask (1 = head, 0 = background), for tests, the demo and benchmarks.

    Layers of an ellipsoid in millimetres (scalp, skull, CSF, brain) with ventricles and deep nuclei of
    other intensities, a smooth multiplicative bias field and Rician noise; size and position jitter with
    `seed`. The head never reaches the first or last slice along any axis, so those slices are empty.
    """
    rng = np.random.default_rng(seed)
    extent = (np.asarray(shape) - 1) * np.asarray(spacing, dtype=np.float64)
    centre = extent * (0.5 + rng.uniform(-0.04, 0.04, 3))
    radii = extent * 0.36 * rng.uniform(0.92, 1.0, 3)
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    offsets = [(g - c) / r for g, c, r in zip(grids, centre, radii, strict=True)]
    radius = np.sqrt(sum(o**2 for o in offsets))

    def blob(centre_fraction: tuple[float, float, float], size: float) -> np.ndarray:
        # An inner ellipsoid in units of the head's radii, so it scales with the head.
        return sum(((o - c) / size) ** 2 for o, c in zip(offsets, centre_fraction, strict=True)) <= 1

    signal = np.zeros(shape, dtype=np.float64)
    signal[radius <= 1.0] = 0.9  # scalp fat: bright on T1
    signal[radius <= 0.92] = 0.15  # skull: dark
    signal[radius <= 0.86] = 0.3  # CSF
    signal[radius <= 0.8] = 0.65  # brain
    signal[blob((0.15, 0.0, 0.05), 0.18) | blob((-0.15, 0.0, 0.05), 0.18)] = 0.25  # ventricles
    signal[blob((0.3, -0.2, -0.15), 0.12) | blob((-0.3, -0.2, -0.15), 0.12)] = 0.8  # deep grey nuclei
    gradient = rng.uniform(-0.25, 0.25, 3)
    bias = np.exp(
        sum(g * (o / 2) for g, o in zip(gradient, offsets, strict=True)) + 0.1 * offsets[0] * offsets[1]
    )
    sigma = 0.03
    real = signal * bias + rng.normal(0, sigma, shape)
    imaginary = rng.normal(0, sigma, shape)
    intensity = (1000 * np.sqrt(real**2 + imaginary**2)).astype(np.float32)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -extent / 2 + np.array([3.7, -12.2, 20.5])
    image = nib.Nifti1Image(intensity, affine)
    label = nib.Nifti1Image((radius <= 1.0).astype(np.uint8), affine)
    for item in (image, label):
        item.header.set_xyzt_units("mm")
    return image, label


def nested_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], *, seed: int, modality: str
) -> tuple[list[np.ndarray], np.ndarray]:
    """Channels and labels of a body with two nested structures (1 = organ, 2 = lesion inside it).

    MRI: two channels of different contrast (organ bright on the first, lesion bright on the second) with
    Rician-like noise. CT: one channel in Hounsfield units (air -1000, tissue 40, organ 70, lesion 150).
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    extent = (np.asarray(shape) - 1) * np.asarray(spacing)

    def ellipsoid(centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1

    body = ellipsoid(extent / 2, extent * 0.45)
    organ_centre = extent * (0.5 + rng.uniform(-0.06, 0.06, 3))
    organ_radii = extent * rng.uniform(0.22, 0.28, 3)
    organ = ellipsoid(organ_centre, organ_radii) & body
    lesion = ellipsoid(organ_centre + organ_radii * rng.uniform(-0.3, 0.3, 3), organ_radii * 0.45) & organ
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    if modality == "ct":
        hu = np.where(body, 40.0, -1000.0)
        hu[organ], hu[lesion] = 70.0, 150.0
        return [(hu + rng.normal(0, 12, shape)).astype(np.float32)], label
    first = np.where(body, 0.3, 0.02) + 0.5 * organ - 0.2 * lesion
    second = np.where(body, 0.2, 0.02) + 0.1 * organ + 0.6 * lesion
    return [(1000 * np.abs(c + rng.normal(0, 0.03, shape))).astype(np.float32) for c in (first, second)], label


def make_nnunet_dataset(
    root: str | Path,
    *,
    training: int = 6,
    test: int = 2,
    shape: tuple[int, int, int] = (40, 36, 12),
    spacing: tuple[float, float, float] = (0.9, 0.9, 3.0),
    modality: str = "mri",
    seed: int = 0,
) -> Path:
    """An nnU-Net v2 raw dataset of nested-structure phantoms: dataset.json, imagesTr/<case>_000c.nii.gz,
    labelsTr/<case>.nii.gz, imagesTs/; anisotropic voxels with an oblique-free, shifted affine."""
    root = Path(root)
    channel_names = {"0": "CT"} if modality == "ct" else {"0": "T1", "1": "T2"}
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-12.5, 30.0, -7.25)
    for index in range(training + test):
        case = f"phantom_{index:03d}"
        channels, label = nested_phantom(shape, spacing, seed=seed + index, modality=modality)
        folder = "imagesTr" if index < training else "imagesTs"
        for number, channel in enumerate(channels):
            nib.save(nib.Nifti1Image(channel, affine), root / folder / f"{case}_{number:04d}.nii.gz")
        if index < training:
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": training, "file_ending": ".nii.gz", "name": f"phantom_{modality}",
    }, indent=2))  # fmt: skip
    return root


def make_depth_folder(root: str | Path, *, train: int = 24, val: int = 8, size: int = 32, seed: int = 0,
                      max_depth: float = 8.0) -> Path:  # fmt: skip
    """Write a depth_folder tree `root/{train,val}/{images,depth}` of textured planes at known distances;
    returns root. Each image holds two fronto-parallel planes (top and bottom half) at depths drawn from
    1 m to `max_depth`; the far one looks as a far wall does: finer texture (frequency ∝ 1/depth) and darker
    (light falls off with distance). Depth PNGs are 16-bit millimetres; one pixel row per plane is unknown (0)."""
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, index, 7])
            pixels, depth = np.zeros((size, size, 3)), np.zeros((size, size))
            for half in (slice(0, size // 2), slice(size // 2, size)):
                distance = rng.uniform(1.0, max_depth)
                shade = 1.0 - 0.8 * (distance - 1.0) / (max_depth - 1.0)
                pattern = _texture("checker", (size // 2, size), 24 / distance, rng.uniform(0, 0.3), rng.uniform())
                colour = _rgb(rng.uniform(), 0.5, 1.0) * shade
                pixels[half] = colour * (0.6 + 0.4 * pattern[..., None])
                depth[half] = distance
            depth[int(rng.integers(0, size))] = 0  # unknown depth, as sensors leave holes
            Image.fromarray(_to_uint8(pixels + rng.normal(0, 0.02, pixels.shape))).save(root / split / "images" / f"{index:03d}.png")
            Image.fromarray((depth * 1000).round().astype(np.uint16)).save(root / split / "depth" / f"{index:03d}.png")
    return root
