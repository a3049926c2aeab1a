"""Downloads against a real loopback HTTP server, and extraction of hostile archives."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dinov3ds.data.download import DATASETS, MARKER, download_dataset, download_file, safe_extract
from dinov3ds.errors import UserError


@dataclass
class ServedRequest:
    path: str
    range: str | None
    status: int
    bytes_sent: int


@dataclass
class FileServer:
    """Serves files from `folder`; can ignore Range or cut the first response after `cut_after` bytes."""

    folder: Path
    url: str = ""
    honour_range: bool = True
    cut_after: int | None = None
    requests: list[ServedRequest] = field(default_factory=list)


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Each request is logged before its response is written, so the client never sees a reply the
        # test cannot yet find in `state.requests`.
        def do_GET(self) -> None:
            path = state.folder / self.path.lstrip("/")
            requested = self.headers.get("Range")
            if not path.is_file():
                state.requests.append(ServedRequest(self.path, requested, 404, 0))
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if requested and state.honour_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
                if start >= len(data):
                    state.requests.append(ServedRequest(self.path, requested, 416, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            length = len(body)
            if state.cut_after is not None and not state.requests:
                body = body[: state.cut_after]
                self.close_connection = True
            state.requests.append(ServedRequest(self.path, requested, 206 if start else 200, len(body)))
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    state = FileServer(folder=tmp_path / "served")
    state.folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _imagenette_tgz(top: str) -> bytes:
    """A tiny archive shaped like ImageNette: top/{train,val}/<wnid>/*.JPEG."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for split in ("train", "val"):
            for wnid in ("n01440764", "n02102040"):
                for index in range(2):
                    payload = f"{split}/{wnid}/{index}".encode()
                    info = tarfile.TarInfo(f"{top}/{split}/{wnid}/img{index}.JPEG")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/imagenette2-160.tgz"


def test_registry_names_and_files() -> None:
    assert set(DATASETS) == {"imagenette2", "imagenette2-320", "imagenette2-160", "ade20k"}
    assert DATASETS["imagenette2-320"].url == "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
    assert DATASETS["imagenette2-160"].md5 == "e793b78cc4c9e9a4ccc0c1155377a412"
    assert DATASETS["ade20k"].folder == "ADEChallengeData2016"
    assert all(re.fullmatch(r"[0-9a-f]{32}", spec.md5) for spec in DATASETS.values())


def test_download_and_extract_imagenette(server: FileServer, tmp_path: Path) -> None:
    data = _imagenette_tgz("imagenette2-160")
    (server.folder / "in.tgz").write_bytes(data)
    root = tmp_path / "datasets"

    folder = download_dataset("imagenette2-160", root, url=f"{server.url}/in.tgz", md5=_md5(data))

    assert folder == root / "imagenette2-160"
    assert (folder / "val" / "n02102040" / "img1.JPEG").read_bytes() == b"val/n02102040/1"
    assert len(list(folder.glob("*/*/*.JPEG"))) == 8
    assert (folder / MARKER).is_file()
    assert (root / "imagenette2-160.tgz").read_bytes() == data
    assert sorted(p.name for p in root.iterdir()) == ["imagenette2-160", "imagenette2-160.tgz"]

    # A second call is a no-op: no request, even with the server gone.
    download_dataset("imagenette2-160", root, url=_closed_port_url(), md5=_md5(data))
    assert len(server.requests) == 1


def test_ade20k_zip_placed_by_hand_needs_no_network(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ADEChallengeData2016/images/training/a.jpg", b"jpg")
        zf.writestr("ADEChallengeData2016/annotations/training/a.png", b"png")
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "ADEChallengeData2016.zip").write_bytes(buffer.getvalue())

    folder = download_dataset("ade20k", root, url=_closed_port_url(), md5=_md5(buffer.getvalue()))

    assert (folder / "annotations" / "training" / "a.png").read_bytes() == b"png"


def test_interrupted_download_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    (server.folder / "blob.bin").write_bytes(data)
    server.cut_after = 12_345
    dest = tmp_path / "out" / "blob.bin"
    part = dest.with_suffix(".bin.part")

    with pytest.raises(UserError, match="offline") as failure:
        download_file(f"{server.url}/blob.bin", dest, _md5(data), progress=False)
    assert "kept" in str(failure.value)
    assert part.read_bytes() == data[:12_345]
    assert not dest.exists()

    assert download_file(f"{server.url}/blob.bin", dest, _md5(data), progress=False) == dest

    assert dest.read_bytes() == data
    assert not part.exists()
    resumed = server.requests[1]
    assert resumed.range == "bytes=12345-"
    assert resumed.status == 206
    assert resumed.bytes_sent == len(data) - 12_345


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(20_000)
    (server.folder / "blob.bin").write_bytes(data)
    server.honour_range = False
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(b"stale bytes from some other file")

    download_file(f"{server.url}/blob.bin", dest, _md5(data), progress=False)

    assert dest.read_bytes() == data
    assert server.requests[0].status == 200


def test_complete_part_file_is_finished_after_416(server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(5_000)
    (server.folder / "blob.bin").write_bytes(data)
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(data)

    download_file(f"{server.url}/blob.bin", dest, _md5(data), progress=False)

    assert dest.read_bytes() == data
    assert [r.status for r in server.requests] == [416]


def test_part_file_longer_than_remote_restarts(server: FileServer, tmp_path: Path) -> None:
    data = os.urandom(5_000)
    (server.folder / "blob.bin").write_bytes(data)
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(os.urandom(6_000))

    download_file(f"{server.url}/blob.bin", dest, _md5(data), progress=False)

    assert dest.read_bytes() == data
    assert [r.status for r in server.requests] == [416, 200]


def test_md5_mismatch_is_refused_and_nothing_extracted(server: FileServer, tmp_path: Path) -> None:
    data = _imagenette_tgz("imagenette2-160")
    (server.folder / "in.tgz").write_bytes(data)
    root = tmp_path / "datasets"
    wrong = "0" * 32

    with pytest.raises(UserError, match=f"MD5 {_md5(data)}, expected {wrong}"):
        download_dataset("imagenette2-160", root, url=f"{server.url}/in.tgz", md5=wrong)

    assert list(root.iterdir()) == []


def test_existing_file_with_right_md5_makes_no_request(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"already here")

    download_file(f"{server.url}/blob.bin", dest, _md5(b"already here"), progress=False)

    assert server.requests == []
    assert dest.read_bytes() == b"already here"


def test_existing_file_with_wrong_md5_is_reported_not_deleted(tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"placed by hand")

    with pytest.raises(UserError, match=str(dest)):
        download_file(_closed_port_url(), dest, "0" * 32, progress=False)
    assert dest.exists()


def test_offline_message_names_url_and_destination(tmp_path: Path) -> None:
    url = _closed_port_url()
    dest = tmp_path / "imagenette2-160.tgz"

    with pytest.raises(UserError) as failure:
        download_file(url, dest, None, progress=False, timeout=5)

    message = str(failure.value)
    assert "offline" in message and url in message and str(dest) in message
    assert "\n" not in message


def test_http_error_is_a_user_error(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="HTTP 404"):
        download_file(f"{server.url}/missing.tgz", tmp_path / "missing.tgz", None, progress=False)


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(UserError) as failure:
        download_dataset("imagenet22k", tmp_path)
    message = str(failure.value)
    assert "imagenet22k" in message
    assert all(name in message for name in DATASETS)


# --- hostile archives --------------------------------------------------------------------------------


def _tar_with(member: tarfile.TarInfo, payload: bytes = b"evil") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        good = tarfile.TarInfo("pkg/good.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
        if member.isfile():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
    return buffer.getvalue()


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zip_with(name: str, payload: bytes = b"evil", mode: int = stat.S_IFREG | 0o644) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("pkg/good.txt", b"good")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, payload)
    return buffer.getvalue()


def _hostile_cases(outside: Path) -> dict[str, tuple[str, bytes]]:
    """Archive suffix and bytes for each way a member could reach `outside`."""
    return {
        "tar-dotdot": (".tgz", _tar_with(_tar_member("pkg/../../../evil"))),
        "tar-absolute": (".tar.gz", _tar_with(_tar_member(str(outside)))),
        "tar-symlink": (".tgz", _tar_with(_tar_member("pkg/link", tarfile.SYMTYPE, str(outside)))),
        "tar-hardlink": (".tgz", _tar_with(_tar_member("pkg/hard", tarfile.LNKTYPE, "pkg/good.txt"))),
        "tar-device": (".tgz", _tar_with(_tar_member("pkg/dev", tarfile.CHRTYPE))),
        "zip-dotdot": (".zip", _zip_with("../../evil")),
        "zip-absolute": (".zip", _zip_with(str(outside))),
        "zip-symlink": (".zip", _zip_with("pkg/link", str(outside).encode(), stat.S_IFLNK | 0o777)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink",
        "tar-hardlink",
        "tar-device",
        "zip-dotdot",
        "zip-absolute",
        "zip-symlink",
    ],
)
def test_hostile_member_is_refused(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "evil"
    suffix, data = _hostile_cases(outside)[case]
    archive = tmp_path / f"hostile{suffix}"
    archive.write_bytes(data)
    dest = tmp_path / "work" / "dest"

    with pytest.raises(UserError) as failure:
        safe_extract(archive, dest)

    message = str(failure.value)
    assert str(archive) in message and "member" in message
    assert not outside.exists() and not (tmp_path / "work" / "evil").exists()
    # Nothing half-done: neither the good member nor the staging folder is left behind.
    assert list(dest.iterdir()) == []


def test_extract_refuses_to_overwrite_existing_entry(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(_imagenette_tgz("imagenette2"))
    (tmp_path / "dest" / "imagenette2").mkdir(parents=True)

    with pytest.raises(UserError, match="already exists"):
        safe_extract(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == [tmp_path / "dest" / "imagenette2"]


def test_damaged_archive_is_a_user_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tgz"
    archive.write_bytes(_imagenette_tgz("imagenette2")[:100])

    with pytest.raises(UserError, match="damaged"):
        safe_extract(archive, tmp_path / "dest")
