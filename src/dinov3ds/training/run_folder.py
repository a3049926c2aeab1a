"""The run folder: an earlier run is never replaced by accident, one process writes at a time, and the
metrics history survives a resume even when the resumed run dies (a full disk, a kill).

    with claim_run_folder(output_dir, resume=False, overwrite=False):   # refuses a folder holding a run
        ...train...
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from dinov3ds.errors import UserError

logger = logging.getLogger("dinov3ds")

LOCK_NAME = ".dinov3ds.lock"
# What a run writes directly in output_dir; `--overwrite` removes exactly these, nothing else of the user's.
RUN_FILES = ("config.yaml", "metrics.csv", "metrics.csv.previous", "hparams.yaml", "curves.png", "val_metrics.json",
             "val_confusion_matrix.png", "val_per_class_accuracy.csv", "val_per_class_iou.csv", "val_predictions.png",
             "run_info.json", "report.html")  # fmt: skip
RUN_FOLDERS = ("checkpoints", "tensorboard", "mlruns", "wandb")


def holds_a_run(folder: Path) -> list[str]:
    """The run files and folders already in `folder` (empty when it holds no run)."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (folder / name).exists()]


def _remove_run(folder: Path) -> None:
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _take_lock(folder: Path, what: str) -> Path:
    """Create the lock file atomically; a lock left by a dead process on this machine is taken over."""
    lock = folder / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = lock.read_text(errors="replace").split() if lock.is_file() else []
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            host = owner[1] if len(owner) > 1 else ""
            if pid is not None and (host != socket.gethostname() or _pid_alive(pid)):
                where = f"pid {pid}" + (f" on {host}" if host != socket.gethostname() else "")
                raise UserError(
                    f"{what} {folder} is in use by another dinov3ds run ({where}); wait for it to finish or "
                    f"choose another {what} (delete {lock} if that run is gone)"
                ) from None
            logger.warning("taking over %s left by a run that is no longer running (%s)", lock, " ".join(owner))
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(me + "\n")
        return lock
    raise UserError(f"cannot lock {lock}; delete it if no dinov3ds run uses {folder}")


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for this process alone (a lock file with pid and host) while the block runs; a second
    writer is refused with a line naming the first (`what` names the setting, e.g. "--out")."""
    lock = _take_lock(folder, what)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold output_dir for one run: refuse one that holds another run (unless resuming or told to overwrite),
    lock it while training writes, release the lock however the run ends. A fresh run refused before its first
    checkpoint (no weights, bad data: a UserError) takes back what it wrote, the folder too when it made it:
    the corrected command then runs without --overwrite."""
    made = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output_dir {folder} is not writable ({error.strerror}); choose another output_dir") from None
    try:
        with folder_lock(folder, "output_dir"):
            existing = holds_a_run(folder)
            if existing and not resume:
                if not overwrite:
                    raise UserError(
                        f"output_dir {folder} already holds a run ({', '.join(existing)}); continue it with "
                        "--resume, replace it with --overwrite, or choose another output_dir"
                    )
                logger.warning("--overwrite: removing the earlier run in %s (%s)", folder, ", ".join(existing))
                _remove_run(folder)
            before = set(folder.iterdir())
            try:
                yield
            except UserError:
                if not resume and not any((folder / "checkpoints").glob("*.ckpt")):
                    _remove_entries(set(folder.iterdir()) - before)
                raise
    except UserError:
        for parent in made:  # deepest first; only folders this run made and left empty
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _remove_entries(paths: set[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class MetricsHistory:
    """metrics.csv across a resume. Lightning's CSVLogger starts the file afresh, so the rows up to the resumed
    step are moved aside first (metrics.csv.previous, an atomic rename) and merged back when the run ends,
    however it ends; a run killed before that finds them in .previous at its next resume."""

    def __init__(self, folder: Path, resumed_step: int | None) -> None:
        self.path = folder / "metrics.csv"
        self.previous = folder / "metrics.csv.previous"
        self.rows: list[dict] = []
        if resumed_step is None:
            return
        if not self.previous.is_file() and self.path.is_file():
            os.replace(self.path, self.previous)
        if self.previous.is_file():
            with open(self.previous, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if row.get("step") and int(row["step"]) <= resumed_step]

    def merge_back(self) -> None:
        """Write the kept rows in front of the new run's rows (atomically), then drop the aside copy."""
        if not self.previous.is_file():
            return
        rows, columns = [], []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                rows, columns = list(reader), list(reader.fieldnames or [])
        columns = list(dict.fromkeys([*columns, *(key for row in self.rows for key in row)]))
        temporary = self.path.with_suffix(".csv.tmp")
        try:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(self.rows + rows)
            os.replace(temporary, self.path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise UserError(
                f"cannot write {self.path} ({error.strerror}); the earlier rows are kept in {self.previous}: "
                "free disk space and resume again"
            ) from None
        self.previous.unlink()
