"""Whether this machine runs a reduced-precision backbone natively, so a slow choice is said out loud.

bf16 halves a frozen backbone's memory everywhere, but it is only *faster* where the hardware multiplies
in bf16: recent GPUs, and CPUs with AVX512-BF16, AMX or Arm's BF16 extension. Elsewhere (an AVX2-only
CPU, say) oneDNN has no bf16 kernel and PyTorch falls back to a generic one several times slower than
float32 (`benchmarks/backbone.py` measured 0.13-0.14x on an AVX2 EPYC). The config is still honoured; the
user is told what it costs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from dinov3ds.errors import UserError

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native multiply-accumulate in that dtype.
CPU_NATIVE_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16", "asimdhp"}),
}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where /proc/cpuinfo does not exist (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_support(dtype: torch.dtype, device: str | torch.device) -> bool | None:
    """True if `device` computes in `dtype` natively, False if it emulates it, None if unknown."""
    if dtype == torch.float32:
        return True
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported() if dtype == torch.bfloat16 else True
    if kind != "cpu":
        return None
    flags = cpu_flags()
    if flags is None or dtype not in CPU_NATIVE_FLAGS:
        return None
    return bool(flags & CPU_NATIVE_FLAGS[dtype])


def slow_dtype_message(dtype: torch.dtype, device: str | torch.device) -> str | None:
    """A one-line warning when `dtype` would run emulated (slower than float32) on `device`, else None."""
    if native_support(dtype, device) is not False:
        return None
    name = str(dtype).removeprefix("torch.")
    kind = torch.device(device).type
    missing = ", ".join(sorted(CPU_NATIVE_FLAGS[dtype])) if kind == "cpu" else "a GPU with native bfloat16"
    return (
        f"backbone dtype {name} on {kind}: this hardware has no native {name} ({missing} missing), so the "
        "forward runs several times slower than float32; it still halves memory. Set backbone.dtype: float32 "
        "for speed here"
    )


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the first GPU if there is one, else the CPU; `cpu`; `cuda` / `cuda:N`, checked to
    exist here, so a typo or a missing GPU is a one-line error before any weights are read."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UserError(f"--device {name!r} is not supported; use {DEVICE_CHOICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {name}: this machine has no CUDA GPU visible to PyTorch; use --device cpu")
    index = 0 if device.index is None else device.index
    if index >= count:
        raise UserError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}; pick one of them")
    return torch.device("cuda", index)
