"""Reading weight files one tensor at a time: Meta's `.pth`, safetensors files, transformers / timm folders.

`TensorFile` knows every tensor's name and shape before reading any bytes, and reads a tensor only when it
is asked for: safetensors through `pread` (no mapping of the whole file: a 27 GB file on a 24 GB machine is
refused by the kernel as one mapping), a `.pth` through a memory map whose pages are handed back to the
kernel once a tensor has been copied. Pickles are refused, never run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import pickle
import stat
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from dinov3ds.errors import UserError

ZIP_EXPANSION_LIMIT = 1.05  # a torch.save archive stores tensors uncompressed: its entries barely exceed the file


def pickle_refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names the offending global, not its advice to disable the check."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or ["not a tensor-only file"])[0][:160]


def require_regular_file(path: Path, what: str = "weight file") -> None:
    """Refuse FIFOs, devices and sockets by `stat` before opening: reading one blocks forever or never ends."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({error.strerror}); check the path") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, device or socket); give the file itself")


def weight_files(path: Path) -> list[Path]:
    """The file(s) holding the tensors: the path itself, or a folder's safetensors shards (or .bin)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{index} is not a safetensors index ({error}); download the folder again") from None
        if any(Path(shard).name != shard for shard in shards):
            raise UserError(f"{index} names shards outside its folder; download the folder again")
        return [path / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise UserError(
        f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin; point "
        "backbone.weights at a transformers or timm model folder, or at a weight file"
    )


def canonical(key: str) -> str:
    """transformers files name blocks `layer.N` while its models say `model.layer.N`: drop that prefix (no
    Meta or timm key starts with it), so a state dict taken from either gives the same keys."""
    return key.removeprefix("model.")


class TensorFile:
    """The tensors of a weight file or model folder: `shapes` (name → shape) up front, `read` one at a time.

    Use as a context manager; `release` hands a read tensor's pages back once it has been copied."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, tuple[object, str]] = {}  # canonical name → (safetensors handle or dict, file key)
        self._mapped: set[str] = set()  # names whose tensor lives in a .pth memory map
        self._files = contextlib.ExitStack()
        for file in weight_files(self.path):
            if not file.exists():
                raise UserError(f"{file} is missing (named in {self.path}'s index); download the folder again")
            require_regular_file(file)
            self._open(file)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._where.clear()
        self._files.close()

    def _open(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            handle = self._files.enter_context(_open_safetensors(file))
            for key in handle.keys():
                self._add(key, tuple(handle.get_slice(key).get_shape()), handle)
            return
        state = _load_pth(file)
        for key, tensor in state.items():
            self._add(key, tuple(tensor.shape), state)
            self._mapped.add(canonical(key))

    def _add(self, key: str, shape: tuple[int, ...], handle: object) -> None:
        self.shapes[canonical(key)] = shape
        self._where[canonical(key)] = (handle, key)

    def read(self, name: str) -> Tensor:
        handle, key = self._where[name]
        if isinstance(handle, dict):
            return handle[key]
        try:
            return handle.get_tensor(key)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
            raise UserError(f"cannot read {name} from {self.path} ({str(error).splitlines()[0][:160]}); download it again") from None

    def release(self, name: str, tensor: Tensor) -> None:
        """Drop the memory-mapped pages of a copied `.pth` tensor, so resident memory holds one copy of the
        weights (the target's), not the file's pages as well. Unmodified private file pages are re-read from
        the file if ever touched again, so nothing is lost."""
        if name in self._mapped and tensor.numel():
            _drop_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def _drop_pages(address: int, length: int) -> None:
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + length) // page * page
    if end > start and hasattr(ctypes.CDLL(None), "madvise"):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


@contextlib.contextmanager
def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", backend="pread")
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, ValueError from the header
        raise UserError(
            f"cannot read {path}: truncated or not a safetensors file ({str(error).splitlines()[0][:160]}); "
            "download it again"
        ) from None
    with handle:
        yield handle


def _refuse_zip_bomb(path: Path) -> None:
    """torch.save writes tensors uncompressed; an archive whose entries inflate far past its size is a zip bomb."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch.load names the problem
    size = path.stat().st_size
    if inflated > ZIP_EXPANSION_LIMIT * size + (1 << 20):
        raise UserError(
            f"refused {path}: its compressed entries inflate from {size:,} to {inflated:,} bytes (a zip bomb; a "
            "PyTorch checkpoint stores tensors uncompressed); use the official weight file"
        )


def _load_pth(path: Path) -> dict[str, Tensor]:
    """A plain state dict with `weights_only=True` (no code runs) and `mmap=True` (no extra copy)."""
    _refuse_zip_bomb(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"refused to load {path}: it contains Python objects, not only tensors ({pickle_refusal_reason(error)}); "
            "use the official weight file"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise UserError(
            f"cannot read {path}: the file is truncated or not a PyTorch checkpoint ({str(error).splitlines()[0]}); "
            "download it again"
        ) from None
    if isinstance(state, dict) and "teacher" in state and isinstance(state["teacher"], dict):
        state = {k.removeprefix("backbone."): v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; use an official weight file (Meta, timm or transformers)")
    return state
