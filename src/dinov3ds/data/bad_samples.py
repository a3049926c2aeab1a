"""`data.on_bad_sample: warn` at read time: an unreadable sample is reported and replaced, not fatal.

Folder checks at start-up (orphan masks, empty class folders) catch missing files; a file that exists but
cannot be decoded is only found when it is read, possibly hours into a run. One corrupt JPEG among a
million should not end that run; many in a row mean something systematic (a wrong `num_classes`, a
broken mount), and that is raised.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, TypeVar

from dinov3ds.errors import DataWarning, UserError

Sample = TypeVar("Sample")
MAX_BAD_IN_A_ROW = 10


def read_sample(
    read: Callable[[int], Sample], index: int, size: int, on_bad_sample: Literal["error", "warn"]
) -> Sample:
    """`read(index)`; with "warn", a sample that raises `UserError` is reported and the next one read instead."""
    if on_bad_sample == "error":
        return read(index)
    for offset in range(min(MAX_BAD_IN_A_ROW, size)):
        try:
            return read((index + offset) % size)
        except UserError as error:
            warnings.warn(f"{error}; skipped (data.on_bad_sample=warn)", DataWarning, stacklevel=2)
            last_error = error
    raise UserError(f"{min(MAX_BAD_IN_A_ROW, size)} unreadable samples in a row, the last: {last_error}")
