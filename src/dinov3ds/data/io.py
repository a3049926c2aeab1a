"""Reading images and label masks from disk, with one clear error per unreadable file.

Everything downstream assumes an 8-bit RGB image and an integer label map, so every odd file format a user
may have (grayscale, alpha, palette, CMYK, 16-bit, EXIF-rotated phone photos) is normalised here, once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dinov3ds.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# Modes whose pixels are integers wider than 8 bits (or floats): scaled, not clipped, to 0-255.
_WIDE_MODES = ("I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _open(path: Path) -> Image.Image:
    """Open and fully decode a file; `load()` inside the try is what catches a truncated file."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error) or type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}; remove or replace it") from error


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the values actually present to 0-255: 12-bit data stored in 16 bits would otherwise be near-black."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha is composited on black rather than dropped: the colour under a fully transparent pixel is
    undefined (often leftover editing data), while black is the same for every file.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if image.mode.startswith(_WIDE_MODES):
        gray = _scale_to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


MAX_ASPECT = 32  # longer side / shorter side; scaling the shorter side to the model's size makes the other huge


def load_image(path: str | Path) -> Image.Image:
    """Load any supported image as an upright 8-bit RGB PIL image.

    An image more than MAX_ASPECT times wider than high (or the reverse) is refused: its shorter side, scaled
    to the model's input, would make the longer one run to hundreds of thousands of pixels (a 10000x1 image
    scaled to 32 rows is 320,000 columns: minutes at 100 % CPU and growing memory, never a result).
    """
    path = Path(path)
    image = _open(path)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: bad EXIF data ({error}); remove or replace it") from error
    if max(image.size) > MAX_ASPECT * min(image.size):
        raise UserError(
            f"image {path} is {image.width}x{image.height}, more than {MAX_ASPECT} times longer than wide; crop it "
            "into tiles or pad it before use"
        )
    return _to_rgb(image)


def load_mask(path: str | Path) -> np.ndarray:
    """Load a label mask as an HxW int64 array of the ids stored in the file.

    A palette (P) mask is read as its indices, never converted to colours. An RGB file whose three
    channels are equal everywhere is accepted as grayscale ids; a coloured RGB mask is an error.
    """
    path = Path(path)
    image = _open(path)
    if image.mode == "LA":
        image = image.getchannel("L")
    if image.mode in ("P", "L", "1") or image.mode.startswith("I"):
        return np.asarray(image).astype(np.int64)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.int64)
        raise UserError(
            f"mask {path} stores colours (RGB); save one class id per pixel as an 8-bit L or P PNG instead"
        )
    raise UserError(f"mask {path} has unsupported mode {image.mode}; save class ids as an 8-bit L or P PNG")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_images(folder: str | Path) -> list[Path]:
    """All image files under `folder`, recursively and sorted; hidden files and folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; check the dataset root and split name")
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not _is_hidden(path, folder)
    )
