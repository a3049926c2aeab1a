"""Where a command writes: only under the folder the user named, never over an input, never the same file
twice in one run, and never over a file already there unless the user said `--overwrite`.

    out = OutputFolder(Path("preds"), inputs=images, overwrite=False)
    path = out.claim(relative_output(image, root) .with_suffix ...)   # or raises a one-line UserError
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dinov3ds.errors import UserError


class OutputFolder:
    def __init__(self, root: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.inputs = {Path(p).resolve() for p in inputs}
        self.overwrite = overwrite
        self.claimed: set[Path] = set()
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file; name a folder (it is created if missing)")

    def claim(self, relative: str | Path) -> Path:
        """The path `root/relative`, made writable, once it is sure that writing there loses nothing."""
        path = self.root / relative
        resolved = path.resolve()
        if resolved in self.inputs:
            raise UserError(f"{path} would overwrite the input {path}; choose another --out")
        if resolved in self.claimed:
            raise UserError(f"two inputs would both write {path}; give them different names or folders")
        if path.exists() and not self.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create {path.parent} ({error.strerror}); choose a writable --out") from None
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"{path.parent} is not writable; choose a writable --out")
        self.claimed.add(resolved)
        return path


def input_root(paths: list[Path]) -> Path:
    """The deepest folder holding every input: outputs mirror the inputs' tree below it, so two inputs with
    one name in different folders never meet (`a/img.jpg`, `b/img.jpg`)."""
    parents = [str(Path(p).resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path(".")


def mirrored(path: Path, root: Path, suffix: str) -> Path:
    """`path`'s place below `root`, its full name kept (so `img.jpg` and `img.png` stay apart) plus `suffix`."""
    relative = Path(path).resolve().relative_to(root)
    return relative.with_name(relative.name + suffix)


def printable(text: str | Path) -> str:
    """A file name that is not UTF-8 (a Latin-1 name from an old archive) printed as \\udcxx, not a crash."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
