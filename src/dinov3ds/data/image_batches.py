"""Image files for inference in batches: decoded and assembled in worker processes, batched by the size they
have after the eval transform (only equal sizes stack), each carrying its index and original size so results
go back to the right file at the right size.

Each file is decoded once: a JPEG at least twice the size the transform resizes it to is decoded at a reduced
scale (`io.decode_image`), resized on uint8 pixels, converted to float at the model's size; where the caller
draws on the full image (segmentation overlays) that full picture travels with the batch instead.

Sizes are read from file headers (EXIF orientation included), not by decoding, so grouping a folder of a
million photos costs a header read each.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dinov3ds.data.io import ORIENTATION, ROTATED, decode_image
from dinov3ds.data.transforms import image_tensor
from dinov3ds.errors import UserError

SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
           (stat.S_ISDIR, "a folder"))  # fmt: skip
PICTURE_BUDGET = 256 << 20  # bytes of full-size pictures in flight (2 batches per worker): 24-megapixel photos 3 at once


class EvalTransform(Protocol):
    """What `data.transforms`' eval transforms offer inference: sizes from the original's, and the step from
    uint8 pixels (at any scale of the original) to the model's input."""

    def resize_size(self, height: int, width: int) -> tuple[int, int]: ...
    def output_size(self, height: int, width: int) -> tuple[int, int]: ...
    def prepare(self, picture: torch.Tensor, resize_to: tuple[int, int]) -> torch.Tensor: ...


def regular_file(path: Path) -> Path:
    """`path`, once `stat` says it is a regular file: opening a FIFO waits forever for a writer, a device may
    never end, a socket cannot be read; each is refused before anything opens it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); check the path") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in SPECIAL if test(mode)), "a special file")
        raise UserError(f"{path} is {kind}, not a regular file (only those are opened: a FIFO or device could block "
                        "forever); give the image or volume file itself")
    return Path(path)


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as `load_image` will return it, from the header; None when the header is unreadable
    (the worker's `load_image` then reports the file)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(ORIENTATION)
            except (OSError, ValueError, SyntaxError):
                orientation = None  # bad EXIF: load_image refuses the file with its own message
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (width, height) if orientation in ROTATED else (height, width)


class ImageFiles(Dataset):
    """(tensor, original (height, width), index) per path, plus with `pictures` the full upright HxWx3 uint8
    picture (then decoded at full scale, since the picture is drawn on)."""

    def __init__(self, paths: list[Path], transform: EvalTransform, pictures: bool = False) -> None:
        self.paths = paths
        self.transform = transform
        self.pictures = pictures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        target = None if self.pictures else self.transform.resize_size
        image, size = decode_image(self.paths[index], target)
        pixels = np.asarray(image)  # the one HxWx3 copy, read-only
        item = (self.transform.prepare(image_tensor(pixels), self.transform.resize_size(*size)), torch.tensor(size), index)
        return (*item, pixels) if self.pictures else item


def collate(samples: list[tuple]) -> tuple:
    """`default_collate` for tensors, sizes and indices; pictures (of any size) as a list of arrays, which
    pinned memory leaves alone (they are drawn on in CPU memory)."""
    batch = default_collate([sample[:3] for sample in samples])
    return (*batch, [sample[3] for sample in samples]) if len(samples[0]) > 3 else tuple(batch)


class SameSizeBatches(Sampler[list[int]]):
    """Batches of indices whose images share an output size, in input order within each size; an image of
    unknown size (unreadable header) goes alone. With `costs`, a batch also ends before their sum would pass
    `budget` (one item alone may)."""

    def __init__(self, sizes: list[tuple[int, int] | None], batch_size: int, costs: list[int] | None = None,
                 budget: int | None = None) -> None:  # fmt: skip
        groups: dict[object, list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size if size is not None else ("alone", index), []).append(index)
        self.batches: list[list[int]] = []
        for members in groups.values():
            batch, total = [], 0
            for index in members:
                cost = costs[index] if costs is not None else 0
                if batch and (len(batch) == batch_size or (budget is not None and total + cost > budget)):
                    self.batches.append(batch)
                    batch, total = [], 0
                batch.append(index)
                total += cost
            self.batches.append(batch)
        self.batches.sort(key=lambda batch: batch[0])  # roughly the input order

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def image_batches(
    paths: list[Path],
    transform: EvalTransform,
    batch_size: int,
    *,
    by_size: bool = False,
    pictures: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader of (images [B,3,H,W], original sizes [B,2], indices [B]), plus with `pictures` a list of the
    full HxWx3 uint8 pictures (by their headers at most PICTURE_BUDGET bytes of them in the batches the workers
    hold, one image over its share alone excepted). With `by_size`
    batches hold only equal transformed sizes (read from headers); without it every image is assumed to come
    out the same size (a centre crop). Batches are assembled in the `workers` processes. Every path is checked to be a
    regular file first."""
    for path in paths:
        regular_file(path)
    dataset = ImageFiles(paths, transform, pictures)
    if not by_size and not pictures:
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, collate_fn=collate)
    headers = [header_size(path) for path in paths]
    keys = [(transform.output_size(*size) if by_size else ()) if size is not None else None for size in headers]
    costs = [3 * size[0] * size[1] if size is not None else 0 for size in headers] if pictures else None
    share = PICTURE_BUDGET // max(1, 2 * workers)  # DataLoader's prefetch: 2 batches per worker
    sampler = SameSizeBatches(keys, batch_size, costs, share if pictures else None)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory, collate_fn=collate)
