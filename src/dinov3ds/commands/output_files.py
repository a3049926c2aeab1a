"""Where a command writes: only under the folder the user named, never over an input, never the same file
twice in one run, never over a file already there unless the user said `--overwrite`, never through a
symbolic link, never a half-written file under the final name, and one command per folder at a time.

    out = OutputFolder(Path("preds"), inputs=images, overwrite=False)
    with out.held("--out"):                                     # a second writer is refused, naming the first
        path = out.claim(mirrored(image, root, ".labels.png"))  # or raises a one-line UserError
        with staged(path) as temporary:                         # written privately, then renamed onto path
            picture.save(temporary)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from dinov3ds.errors import UserError
from dinov3ds.training.run_folder import folder_lock

STAGE_PREFIX = ".dinov3ds-"  # private folders a write goes through; one left by a killed run is hidden


class OutputFolder:
    def __init__(self, root: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.inputs = {Path(p).resolve() for p in inputs}
        self.overwrite = overwrite
        self.claimed: set[Path] = set()
        self.created: list[Path] = []  # folders this made (root, its missing parents, result subfolders)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file; name a folder (it is created if missing)")

    @contextlib.contextmanager
    def held(self, what: str) -> Iterator[OutputFolder]:
        """The folder, created if missing, locked for this process while the block runs (`what` names the
        setting in the refusal); the folders this created (missing parents of root included) are removed
        again, deepest first, when nothing was written in them: a failed command leaves the tree as it was."""
        try:
            self._make(self.root, what)
            if not os.access(self.root, os.W_OK):
                raise UserError(f"{self.root} is not writable; choose a writable {what}")
            with folder_lock(self.root, what):
                yield self
        finally:
            for folder in sorted(self.created, key=lambda path: len(path.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty

    def _make(self, folder: Path, what: str) -> None:
        """`folder` and its missing parents, each new one noted in `created`."""
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir(exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create {folder} ({error.strerror}); choose a writable {what}") from None
            self.created.append(folder)

    def claim(self, relative: str | Path) -> Path:
        """The path `root/relative`, made writable, once it is sure that writing there loses nothing."""
        path = self._inside(relative)
        resolved = path.resolve()
        if resolved in self.inputs:
            raise UserError(f"{path} would overwrite the input {path}; choose another --out")
        if resolved in self.claimed:
            raise UserError(f"two inputs would both write {path}; give them different names or folders")
        if path.is_dir():
            raise UserError(f"{path} is a folder where a result file goes; move it away or choose another --out")
        if path.exists() and not self.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
        self._make(path.parent, "--out")
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"{path.parent} is not writable; choose a writable --out")
        self.claimed.add(resolved)
        return path

    def _inside(self, relative: str | Path) -> Path:
        """`root/relative`, refused when a part of it below root is a symbolic link (a dangling one included):
        writing there would land wherever the link points, outside the folder the user named."""
        path = self.root
        for part in Path(relative).parts:
            if part == ".." or Path(part).is_absolute():
                raise UserError(f"{relative} is not a name inside {self.root}; outputs stay inside --out")
            path = path / part
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link; dinov3ds writes only inside {self.root}, never through "
                                "a link: remove the link or choose another --out")  # fmt: skip
        return path

    @contextlib.contextmanager
    def staged_files(self) -> Iterator[Path]:
        """A private folder for a writer that puts several files in one folder (the metric reports): each
        file it leaves there is renamed onto its name in root (claimed now if it was not before)."""
        with _private_folder(self.root, self.root) as stage:
            yield stage
            for file in sorted(stage.iterdir()):
                target = self.root / file.name
                if target.resolve() not in self.claimed:
                    self.claim(file.name)
                os.replace(file, target)


@contextlib.contextmanager
def _private_folder(folder: Path, shown: Path) -> Iterator[Path]:
    """A new folder in `folder`, made by this process alone (mode 0700), so no link can be waiting in it;
    removed with whatever is left in it however the block ends. A write error is one line naming `shown`."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, suffix=".tmp", dir=folder))
    except OSError as error:
        raise UserError(f"cannot write in {folder} ({error.strerror}); choose a writable --out") from None
    try:
        yield stage
    except OSError as error:
        raise UserError(f"cannot write {shown} ({error.strerror}); free disk space or choose a writable --out") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A private name (same file name, same disk) that is renamed onto `path` when the block ends without an
    error: a link at `path` is replaced, never written through, and a half-written file never has the name."""
    path = Path(path)
    with _private_folder(path.parent, path) as stage:
        yield stage / path.name
        os.replace(stage / path.name, path)


@contextlib.contextmanager
def written(path: Path, mode: str = "w", **options) -> Iterator[IO]:
    """`open(path, mode, ...)` through `staged`: a new file (O_EXCL), on `path` once complete and closed."""
    with staged(path) as temporary, open(temporary, mode.replace("w", "x"), **options) as handle:
        yield handle


PENDING_BUDGET = 256 << 20  # bytes of pictures held by writes not yet done


class ParallelWriter:
    """Output files written on one thread per core while the caller goes on to the next batch. Pillow's PNG
    encoder (zlib) and numpy release the GIL, so a batch's overlays encode on every core instead of one after
    another between forwards (on 2 cores 1.9x the pictures per second). Pending writes are bounded by the bytes
    they hold (`PENDING_BUDGET`; one always runs) and by 4 per thread; a write's error is raised in the caller
    when a `submit` waits for that write or when the block ends, and the writes not started are dropped."""

    def __init__(self, threads: int, budget: int = PENDING_BUDGET) -> None:
        self._threads, self._budget, self._held = max(1, threads), budget, 0
        self._pending: deque[tuple[int, Future]] = deque()
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="dinov3ds-writer")

    def submit(self, nbytes: int, write: Callable[..., None], *args) -> None:
        """Run `write(*args)` on a writer thread once the pending writes leave room for `nbytes` more."""
        while self._pending and (self._held + nbytes > self._budget or len(self._pending) >= 4 * self._threads):
            self._finish_oldest()
        self._pending.append((nbytes, self._pool.submit(write, *args)))
        self._held += nbytes

    def _finish_oldest(self) -> None:
        nbytes, future = self._pending.popleft()
        self._held -= nbytes
        future.result()

    def __enter__(self) -> ParallelWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_) -> None:
        try:
            while self._pending and kind is None:
                self._finish_oldest()
        finally:
            for _, future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


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
