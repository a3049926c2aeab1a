"""Reading images and label masks from disk, with one clear error per unreadable file.

Everything downstream assumes an 8-bit RGB image and an integer label map, so every odd file format a user
may have (grayscale, alpha, palette, CMYK, 16-bit, EXIF-rotated phone photos) is normalised here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dinov3ds.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# Modes whose pixels are integers wider than 8 bits (or floats): scaled, not clipped, to 0-255.
_WIDE_MODES = ("I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
ORIENTATION = 0x0112  # the EXIF tag
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height

# The upright (height, width) an image of upright (height, width) is resized to next: what decoding may stop at.
Target = Callable[[int, int], tuple[int, int]]


def _open(path: Path, target: Target | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """A file fully decoded (at a reduced scale where `_draft` allows) and its full (width, height) as stored;
    `load()` inside the try is what catches a truncated file."""
    try:
        image = Image.open(path)
        size = image.size
        if target is not None and image.format == "JPEG":
            _draft(image, target)
        image.load()
        return image, size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error) or type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}; remove or replace it") from error


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag; a bad EXIF block raises (the caller reports the file)."""
    return image.getexif().get(ORIENTATION)


def _draft(image: Image.Image, target: Target) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (its DCT scaling: far fewer pixels to decode and resize) when
    the image is at least twice the `target` size on both sides; PIL's `draft` keeps the result at or above
    the target, so the caller's resize still does the antialiased work."""
    try:
        rotated = _orientation(image) in ROTATED
    except (OSError, SyntaxError, ValueError):
        return  # bad EXIF: load_image refuses the file with its own message
    width, height = image.size
    out_height, out_width = target(*((width, height) if rotated else (height, width)))
    wanted = (out_height, out_width) if rotated else (out_width, out_height)  # (width, height) as stored
    if width >= 2 * wanted[0] and height >= 2 * wanted[1]:
        image.draft(image.mode, wanted)


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
    """Load any supported image as an upright 8-bit RGB PIL image (see `decode_image`)."""
    return decode_image(path)[0]


def decode_image(path: str | Path, target: Target | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Any supported image as an upright 8-bit RGB PIL image, and its full upright (height, width).

    With `target` (the size the caller resizes the image to, from its full size) a JPEG at least twice that
    size on both sides is decoded at a reduced scale (`_draft`), so the image may be smaller than the size
    returned beside it, never smaller than the target.

    An image more than MAX_ASPECT times wider than high (or the reverse) is refused: its shorter side, scaled
    to the model's input, would make the longer one run to hundreds of thousands of pixels (a 10000x1 image
    scaled to 32 rows is 320,000 columns: minutes at 100 % CPU and growing memory, never a result).
    """
    path = Path(path)
    image, (width, height) = _open(path, target)
    try:
        rotated = _orientation(image) in ROTATED
        ImageOps.exif_transpose(image, in_place=True)  # in place: no full-size copy of an upright photo
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: bad EXIF data ({error}); remove or replace it") from error
    height, width = (width, height) if rotated else (height, width)  # upright from here
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(
            f"image {path} is {width}x{height}, more than {MAX_ASPECT} times longer than wide; crop it "
            "into tiles or pad it before use"
        )
    return _to_rgb(image), (height, width)


def load_mask(path: str | Path) -> np.ndarray:
    """Load a label mask as an HxW int64 array of the ids stored in the file.

    A palette (P) mask is read as its indices, never converted to colours. An RGB file whose three
    channels are equal everywhere is accepted as grayscale ids; a coloured RGB mask is an error.
    """
    path = Path(path)
    image, _ = _open(path)
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
