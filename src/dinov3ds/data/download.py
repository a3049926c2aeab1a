"""Dataset archives: resumable, checksum-verified downloads and extraction that cannot escape its folder.

Datasets are gigabytes fetched over flaky links, so a broken transfer resumes from its `.part` file instead
of starting over, and nothing becomes visible under its final name before its MD5 matches. Archives come
from the internet, so every member is checked before anything is written: no absolute paths, no `..`, no
links or device files.

    from dinov3ds.data.download import download_dataset
    folder = download_dataset("imagenette2-320", Path("~/datasets").expanduser())

NYU Depth v2 (`nyu-depth-v2`) is two raw MATLAB files rather than an archive: they are fetched the same way
(checked by exact size, since no MD5 is published) and converted once by `data/nyu.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from dinov3ds.data import nyu
from dinov3ds.errors import UserError

# Written inside the extracted folder last, so its presence means download + verify + extract all finished.
MARKER = ".dinov3ds-complete"

# Python >= 3.12 and the 3.10/3.11 security releases have tarfile's extraction filters; use them as a
# second line of defence behind our own member checks.
_TAR_FILTER: dict[str, str] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

_NETWORK_ERRORS = (URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile, zlib.error)


@dataclass(frozen=True)
class DatasetArchive:
    """Where a dataset's archive lives, how to recognise it, and the folder it unpacks to."""

    name: str
    url: str
    md5: str
    filename: str
    folder: str


def _imagenette(name: str, md5: str) -> DatasetArchive:
    return DatasetArchive(
        name=name,
        url=f"https://s3.amazonaws.com/fast-ai-imageclas/{name}.tgz",
        md5=md5,
        filename=f"{name}.tgz",
        folder=name,
    )


DATASETS: dict[str, DatasetArchive] = {
    archive.name: archive
    for archive in (
        _imagenette("imagenette2", "fe2fc210e6bb7c5664d602c3cd71e612"),
        _imagenette("imagenette2-320", "3df6f0d01a2c9592104656642f5e78a3"),
        _imagenette("imagenette2-160", "e793b78cc4c9e9a4ccc0c1155377a412"),
        DatasetArchive(
            name="ade20k",
            url="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            md5="7328b3957e407ddae1d3cbf487f149ef",
            filename="ADEChallengeData2016.zip",
            folder="ADEChallengeData2016",
        ),
    )
}


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks so multi-gigabyte archives never sit in memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: Path,
    md5: str | None,
    *,
    size: int | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` if present; `dest` appears only once its MD5 (and its
    byte `size`, where given) matches.

    An existing `dest` is checked and reused without touching the network, so a file placed by hand works
    offline. On a network failure, or a transfer that ends short of `size`, the `.part` file is kept so the
    next call resumes it.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    if dest.exists():
        _check_existing(dest, md5, size, part)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if part.is_symlink():  # appending through a link would write outside the download folder
        raise UserError(f"{part} is a symbolic link; delete it, then run again")
    try:
        _fetch(url, part, chunk_size=chunk_size, timeout=timeout, progress=progress)
    except HTTPError as err:
        raise UserError(
            f"{url} answered HTTP {err.code} ({err.reason}): check the URL, or download the file by hand "
            f"and save it as {dest}"
        ) from err
    except _NETWORK_ERRORS as err:
        reason = err.reason if isinstance(err, URLError) else err
        kept = f" (the partial download {part} is kept and resumes)" if part.exists() else ""
        raise UserError(
            f"could not download {url} ({reason}); this machine looks offline: download the file by hand "
            f"and save it as {dest}, then run again{kept}"
        ) from err
    if size is not None and (received := part.stat().st_size) != size:
        if received > size:  # not a prefix of the right file: nothing to resume
            part.unlink()
            raise UserError(f"{url} sent {received:,} bytes, expected {size:,}: the file was deleted; check the URL")
        raise UserError(f"{url} ended after {received:,} of {size:,} bytes; {part} is kept: run again and the "
                        "download resumes (if it stops here again, that server holds a truncated copy: use another URL)")  # fmt: skip
    if md5 is not None and (actual := file_md5(part, chunk_size)) != md5.lower():
        part.unlink()
        raise UserError(
            f"{url} downloaded with MD5 {actual}, expected {md5.lower()}: the file was deleted; run again, "
            f"or download it by hand and save it as {dest}"
        )
    os.replace(part, dest)
    return dest


def _check_existing(dest: Path, md5: str | None, size: int | None, part: Path) -> None:
    """A file already at `dest` was put there by us (verified) or by hand; never delete a hand-placed one."""
    if size is not None and (actual_size := dest.stat().st_size) != size:
        raise UserError(f"{dest} is {actual_size:,} bytes, expected {size:,}: if it is an interrupted download, rename "
                        f"it to {part.name} and run again to resume it; otherwise delete it and run again")  # fmt: skip
    if md5 is None:
        return
    actual = file_md5(dest)
    if actual != md5.lower():
        raise UserError(
            f"{dest} has MD5 {actual}, expected {md5.lower()}: delete it to download it again, "
            "or replace it with a correct copy"
        )


def _fetch(url: str, part: Path, *, chunk_size: int, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part`, or rewrite it when the server cannot serve a byte range."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dinov3ds"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        err.close()
        if err.code != 416 or not offset:
            raise
        # 416: nothing left past `offset`. If the server's size differs, the part is stale: start over.
        total = _range_total(err.headers.get("Content-Range"))
        if total is None or total == offset:
            return
        part.unlink()
        _fetch(url, part, chunk_size=chunk_size, timeout=timeout, progress=progress)
        return
    with response:
        resumed = offset > 0 and response.status == 206
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        bar = tqdm(
            total=None if expected is None else start + expected,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        )
        with open(part, "ab" if resumed else "wb") as file, bar:
            while chunk := response.read(chunk_size):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # urllib returns a short body silently when the peer closes early; treat it as the network failure it is.
    if expected is not None and received < expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def _range_total(content_range: str | None) -> int | None:
    """The full size from a `Content-Range: bytes */N` header, if the server sent one."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a .tar/.tgz/.tar.gz/.zip into `dest`, refusing any member that could write outside it.

    Members are unpacked into a hidden staging folder inside `dest` and each top-level entry is renamed into
    place only after the whole archive succeeded, so an interrupted run never leaves a half-filled dataset.
    """
    archive, dest = Path(archive), Path(dest)
    extract = _extractor(archive)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=dest))
    try:
        try:
            extract(archive, staging)
        except _DAMAGED_ARCHIVE_ERRORS as err:
            raise UserError(
                f"{archive} is damaged or not a valid archive ({err}): delete it and download it again"
            ) from err
        entries = sorted(staging.iterdir())
        for entry in entries:
            if os.path.lexists(dest / entry.name):
                raise UserError(
                    f"{dest / entry.name} already exists: move it away or delete it, then extract {archive} again"
                )
        for entry in entries:
            os.replace(entry, dest / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extractor(archive: Path) -> Callable[[Path, Path], None]:
    name = archive.name.lower()
    if name.endswith(".zip"):
        return _extract_zip
    if name.endswith((".tar", ".tgz", ".tar.gz")):
        return _extract_tar
    raise UserError(f"{archive}: unsupported archive type; expected .tar, .tgz, .tar.gz or .zip")


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(
            f"{archive}: member {name!r} would be written outside the destination (absolute path or '..'); "
            "refusing to extract it: use a trusted copy of the archive"
        )


def _refuse_kind(archive: Path, name: str, kind: str) -> UserError:
    return UserError(
        f"{archive}: member {name!r} is a {kind}; refusing to extract it (only files and folders are "
        "allowed): use a trusted copy of the archive"
    )


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or pipe"
    return "special file"


def _checked_tar_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield members as the tar stream is read, so a gzip archive is decompressed once, not twice."""
    for member in tar:
        _check_name(archive, member.name)
        if not (member.isfile() or member.isdir()):
            raise _refuse_kind(archive, member.name, _tar_kind(member))
        yield member


def _extract_tar(archive: Path, staging: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(staging, members=_checked_tar_members(tar, archive), **_TAR_FILTER)


def _extract_zip(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        # The central directory lists every member up front, so check them all before writing anything.
        for info in zf.infolist():
            _check_name(archive, info.filename)
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                kind = "symbolic link" if file_type == stat.S_IFLNK else "special file"
                raise _refuse_kind(archive, info.filename, kind)
        zf.extractall(staging)


def download_dataset(name: str, root: Path, *, url: str | None = None, md5: str | None = None) -> Path:
    """Make dataset `name` ready under `root` and return its folder; a second call does nothing.

    `url` and `md5` override the registry (mirrors, tests); for nyu-depth-v2, `url` is a folder holding both
    of its files under their official names. An archive already in `root` (placed by hand on an offline
    machine) is verified and used without the network. The archive is kept after extraction.
    """
    if name == nyu.NAME:
        return _prepare_nyu(Path(root), url)
    spec = DATASETS.get(name)
    if spec is None:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join([*DATASETS, nyu.NAME])}")
    root = Path(root)
    folder = root / spec.folder
    if (folder / MARKER).is_file():
        return folder
    if folder.exists():
        raise UserError(
            f"{folder} exists but was not set up by dinov3ds: delete it and run again, "
            "or point the config at that folder directly"
        )
    archive = download_file(url or spec.url, root / spec.filename, md5 or spec.md5)
    safe_extract(archive, root)
    if not folder.is_dir():
        raise UserError(f"{archive} does not contain the folder {spec.folder}/: check the archive or the URL")
    (folder / MARKER).write_text(f"{spec.name} {(md5 or spec.md5).lower()}\n")
    return folder


def _prepare_nyu(root: Path, base_url: str | None) -> Path:
    """NYU Depth v2: splits.mat and the labeled .mat (each fetched unless already in `root`; from `base_url/`
    under its official name when given), then converted once into `root/nyu_depth_v2`."""
    folder = root / nyu.FOLDER
    if (folder / MARKER).is_file():
        return folder
    nyu.refuse_foreign(folder, MARKER)  # before 2.8 GB are fetched for nothing
    for name, official in nyu.URLS.items():  # splits.mat first: a wrong URL fails before 2.8 GB
        size = nyu.RELEASE.labeled_bytes if name == nyu.LABELED else None
        download_file(f"{base_url.rstrip('/')}/{name}" if base_url else official, root / name, None, size=size)
    return nyu.convert(root / nyu.LABELED, root / nyu.SPLITS, folder, MARKER)
