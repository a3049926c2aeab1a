"""Pictures laid out without gaps: text bands, legend strips, captions, tiles scaled to one width.

Drawn with PIL (its bundled font, no system font needed) so a picture of many tiles costs milliseconds
and the tiles touch: no figure margins between them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAPER = (255, 255, 255)
INK = (20, 20, 20)


@lru_cache(maxsize=8)
def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def _text_width(text: str, size: int) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def text_band(titles: list[str], widths: list[int], size: int = 15) -> np.ndarray:
    """One row of titles, each centred over its column (columns `widths` pixels wide)."""
    height = size + 10
    band = Image.new("RGB", (sum(widths), height), PAPER)
    draw = ImageDraw.Draw(band)
    left = 0
    for title, width in zip(titles, widths):
        draw.text((left + (width - _text_width(title, size)) // 2, 4), title, fill=INK, font=font(size))
        left += width
    return np.asarray(band)


def legend_strip(entries: list[tuple[str, tuple[int, int, int] | None]], width: int, size: int = 13) -> np.ndarray:
    """Swatch + name per entry, flowed into lines `width` wide; an entry without colour gets a crossed
    white swatch (what stays clear in the picture)."""
    line_height, swatch, gap = size + 8, size, 14
    placed, x, y = [], 6, 4
    for text, colour in entries or [("no classes in these pictures", None)]:
        needed = swatch + 5 + _text_width(text, size)
        if x > 6 and x + needed > width - 6:
            x, y = 6, y + line_height
        placed.append((x, y, text, colour))
        x += needed + gap
    strip = Image.new("RGB", (max(width, 1), y + line_height + 2), PAPER)
    draw = ImageDraw.Draw(strip)
    for x, y, text, colour in placed:
        box = (x, y + 2, x + swatch, y + 2 + swatch)
        draw.rectangle(box, fill=colour or PAPER, outline=INK)
        if colour is None:
            draw.line(box, fill=INK)
        draw.text((x + swatch + 5, y), text, fill=INK, font=font(size))
    return np.asarray(strip)


def caption(picture: np.ndarray, text: str, size: int = 13) -> np.ndarray:
    """`picture` with `text` in white on a dark box in its top-left corner."""
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, _text_width(text, size) + 8, size + 6), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font=font(size))
    return np.asarray(image)


def to_width(picture: np.ndarray, width: int, smooth: bool = False) -> np.ndarray:
    """`picture` scaled to `width` pixels, aspect kept; nearest neighbour unless `smooth` (label edges stay sharp)."""
    height, current = picture.shape[:2]
    if current == width:
        return picture
    size = (width, max(1, round(height * width / current)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR if smooth else Image.NEAREST))
