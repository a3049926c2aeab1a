"""Image files for inference in batches: decoded in worker processes, batched by the size they have after the
eval transform (only equal sizes stack), each carrying its index and original size so results go back to
the right file at the right size.

Sizes are read from file headers (EXIF orientation included), not by decoding, so grouping a folder of a
million photos costs a header read each.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov3ds.data.io import load_image
from dinov3ds.errors import UserError

ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
           (stat.S_ISDIR, "a folder"))  # fmt: skip


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
                orientation = image.getexif().get(0x0112)
            except (OSError, ValueError, SyntaxError):
                orientation = None  # bad EXIF: load_image refuses the file with its own message
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (width, height) if orientation in ROTATED else (height, width)


class ImageFiles(Dataset):
    """(tensor, original (height, width), index) per path; `transform` maps a PIL image to a tensor."""

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = load_image(self.paths[index])
        return self.transform(image), torch.tensor([image.height, image.width]), index


class SameSizeBatches(Sampler[list[int]]):
    """Batches of indices whose images share an output size, in input order within each size; an image of
    unknown size (unreadable header) goes alone."""

    def __init__(self, sizes: list[tuple[int, int] | None], batch_size: int) -> None:
        groups: dict[object, list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size if size is not None else ("alone", index), []).append(index)
        self.batches = [members[start : start + batch_size] for members in groups.values()
                        for start in range(0, len(members), batch_size)]  # fmt: skip
        self.batches.sort(key=lambda batch: batch[0])  # roughly the input order

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def image_batches(
    paths: list[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    output_size: Callable[[int, int], tuple[int, int]] | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader of (images [B,3,H,W], original sizes [B,2], indices [B]). With `output_size` (the transform's
    size for an original (height, width)) batches hold only equal sizes; without it every image is assumed to
    come out the same size (a centre crop). Every path is checked to be a regular file first."""
    for path in paths:
        regular_file(path)
    if output_size is None:
        return DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                          pin_memory=pin_memory)  # fmt: skip
    sizes = [header_size(path) for path in paths]
    sizes = [output_size(*size) if size is not None else None for size in sizes]
    return DataLoader(ImageFiles(paths, transform), batch_sampler=SameSizeBatches(sizes, batch_size),
                      num_workers=workers, pin_memory=pin_memory)  # fmt: skip
