"""What this machine can give: devices and cores that exist, free memory, and native reduced precision.

A request it cannot meet (a GPU it lacks, more training processes than cores, sliding-window buffers larger
than its free memory) is refused with one line before anything is allocated or started.

bf16 halves a frozen backbone's memory everywhere, but it is only *faster* where the hardware multiplies
in bf16: recent GPUs, and CPUs with AVX512-BF16, AMX or Arm's BF16 extension. Elsewhere (an AVX2-only
CPU, say) oneDNN has no bf16 kernel and PyTorch falls back to a generic one several times slower than
float32 (`benchmarks/backbone.py` measured 0.13-0.14x on an AVX2 EPYC). The config is still honoured; the
user is told what it costs.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from dinov3ds.errors import UserError

logger = logging.getLogger(__name__)

# Overrides the CPU's bf16 detection: 0 where a CPU lists bf16 but runs it slowly (an emulating hypervisor),
# 1 where it computes bf16 natively without saying so; the test suite sets 0 so results match on every CPU.
CPU_BF16_VARIABLE = "DINOV3DS_CPU_BF16"

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native multiply-accumulate in that dtype.
CPU_NATIVE_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16", "asimdhp"}),
}


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags in a /proc/cpuinfo text: x86 lists them as "flags", Arm as "Features"."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags, or None where /proc/cpuinfo does not exist (not Linux)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def native_support(dtype: torch.dtype, device: str | torch.device) -> bool | None:
    """True if `device` computes in `dtype` natively, False if it emulates it, None if unknown."""
    if dtype == torch.float32:
        return True
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported() if dtype == torch.bfloat16 else True
    if kind != "cpu":
        return None
    if dtype == torch.bfloat16 and os.environ.get(CPU_BF16_VARIABLE) in ("0", "1"):
        return os.environ[CPU_BF16_VARIABLE] == "1"
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


def inference_dtype(device: str | torch.device) -> tuple[torch.dtype, str]:
    """`dtype: auto` for a backbone at inference on `device`, and why (for the log): bfloat16 where the device
    multiplies in it natively (about 2.5x float32's speed on AMX CPUs, `benchmarks/backbone.py`), float32
    elsewhere, where bf16 would run emulated and slower. Detected from the hardware, never from a model name."""
    kind = torch.device(device).type
    name = "this CPU" if kind == "cpu" else f"this {kind.upper()} device"
    native = native_support(torch.bfloat16, device)
    if kind == "cpu" and os.environ.get(CPU_BF16_VARIABLE) in ("0", "1"):
        why = f"{CPU_BF16_VARIABLE}={os.environ[CPU_BF16_VARIABLE]} says {name} does{'' if native else ' not'} compute it natively"
    elif native and kind == "cpu":
        why = f"{name} computes it natively ({', '.join(sorted(cpu_flags() & CPU_NATIVE_FLAGS[torch.bfloat16]))})"
    elif native:
        why = f"{name} computes it natively"
    elif native is None:
        why = f"{name} is not known to compute bfloat16 natively"
    else:
        why = f"{name} has no native bfloat16, so bfloat16 would run slower"
    if native:
        return torch.bfloat16, f"backbone in bfloat16: {why}; --float32 (backbone.dtype: float32) keeps float32"
    return torch.float32, f"backbone in float32: {why}"


def auto_inference_dtype(device: str | torch.device) -> torch.dtype:
    """`inference_dtype`'s choice, its reason logged once per process (a command may load several models)."""
    dtype, reason = inference_dtype(device)
    _log_once(reason)
    return dtype


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or `taskset`'s share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _device_request(devices: int | str | list[int]) -> int | list[int] | str:
    """Lightning's `devices` forms as a count, a list of GPU indices or "auto"; anything else refused."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return text
        try:
            return [int(part) for part in text.split(",") if part.strip()] if "," in text else int(text)
        except ValueError:
            raise UserError(f"trainer.devices {devices!r} is not a count, a list of GPU indices or auto") from None
    return list(devices) if isinstance(devices, (list, tuple)) else devices


def process_count(accelerator: str, devices: int | str | list[int]) -> int:
    """How many processes Lightning will start for `devices` on one node: a list's length, a count, or for
    -1 / auto every GPU there is (one process where the run is on the CPU or there is no GPU)."""
    request = _device_request(devices)
    if isinstance(request, list):
        return len(request)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = accelerator.strip().lower() in ("gpu", "cuda", "auto") and gpus > 0
    if request in ("auto", -1):
        return gpus if on_gpu else 1
    return request


def check_devices(accelerator: str, devices: int | str | list[int], key: str = "trainer.devices") -> None:
    """Refuse, before any process starts, what this machine cannot give: GPUs it does not have, GPU indices on a
    CPU-only run (Lightning's MisconfigurationException otherwise) or more CPU processes than its cores (each
    holds a model copy and its loader workers; 64 of them on 2 cores exhaust memory instead of training)."""
    request = _device_request(devices)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind = accelerator.strip().lower()
    if kind in ("gpu", "cuda") and not gpus:
        raise UserError(f"trainer.accelerator {accelerator}: this machine has no CUDA GPU visible to PyTorch; "
                        "use trainer.accelerator=cpu")  # fmt: skip
    if kind not in ("gpu", "cuda", "cpu", "auto") or request == "auto":
        return  # other accelerators (mps, tpu) are Lightning's to check
    if isinstance(request, list) and (not request or len(set(request)) != len(request)):
        raise UserError(f"{key} {devices!r}: list each GPU index once")
    if kind == "cpu" or not gpus:
        cores = usable_cores()
        why = "trainer.accelerator is cpu" if gpus else "no CUDA GPU here"
        if isinstance(request, list):
            raise UserError(f"{key} {devices!r} names GPUs, but this run trains on the CPU ({why}): give a number "
                            f"of CPU processes from 1 to {cores} (the cores this process may use)")  # fmt: skip
        if not 1 <= request <= cores:
            what = "CPU training processes" if key.startswith("trainer.") else "CPU processes"
            raise UserError(f"{key} {request} asks for {request} {what}, but this process may use "
                            f"{cores} cores (os.sched_getaffinity): give {key} from 1 to {cores}")  # fmt: skip
        return
    indices = request if isinstance(request, list) else []
    if isinstance(request, int) and not (1 <= request <= gpus or request == -1):
        raise UserError(f"{key} {request}: this machine has {gpus} GPU(s); give 1 to {gpus} (or -1 for all)")
    bad = [index for index in indices if not 0 <= index < gpus]
    if bad:
        raise UserError(f"{key} {devices!r} names GPU {bad[0]}; this machine has {gpus} GPU(s), 0 to {gpus - 1}")


def available_memory(device: str | torch.device) -> int | None:
    """Bytes still free on `device`: a GPU's free memory, or the CPU's MemAvailable (within a cgroup v2
    limit, a container's); None where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    lines = [line.split() for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    free = int(lines[0][1]) * 1024 if lines else None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" or free is None else min(free, int(limit) - used)
