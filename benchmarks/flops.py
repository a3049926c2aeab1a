"""Backbone forward FLOP/s as a fraction of the same device's measured matmul FLOP/s, per dtype.

"Fast" only means something next to what the hardware can do. The FLOPs of one forward are *counted*,
not estimated: `torch.utils.flop_counter.FlopCounterMode` over a batch-1 forward with attention forced to
the math backend so its two matmuls are counted too (2 FLOPs per multiply-add; batch scales linearly).
The ceiling is *measured*: the best median time of large square matmuls (in nn.Linear's x @ W^T layout)
in the same dtype on the same device, not the datasheet number no kernel reaches. The timed forward itself uses the normal fast path
(SDPA flash/efficient kernels, weights stored in the dtype, `torch.inference_mode`).

Target (issue 7): on a GPU, bf16 `vitl16` at 512, batch 32, reaches >= 40% of the measured bf16 matmul
FLOP/s. On a CPU the table is informative; its bf16 row shows whether bf16 pays off on that CPU at all.

Run from the repository root: `python benchmarks/flops.py` (GPU when present, else CPU; under 2 min on
2 CPU cores). `--rows vitl16:512:32:bfloat16 ...` chooses rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import torch  # noqa: E402
from _common import markdown_table, write_result  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

GPU_TARGET = ("vitl16", 512, 32, "bfloat16")
GPU_TARGET_FRACTION = 0.40
GPU_ROWS = [GPU_TARGET, ("vitl16", 224, 32, "bfloat16"), ("vitb16", 512, 32, "bfloat16"), ("vitl16", 512, 32, "float32")]
# The bf16 row tests the premise "bf16 is faster on this CPU": true only with native bf16 instructions.
CPU_ROWS = [("vits16", 224, 8, "float32"), ("vitb16", 224, 8, "float32"), ("vits16", 224, 8, "bfloat16")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_seconds(fn, sync, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def matmul_peak(dtype: torch.dtype, device: torch.device) -> dict:
    """Best FLOP/s of square matmuls over a few sizes: the achievable ceiling on this device and dtype."""
    sizes = [4096, 8192, 16384] if device.type == "cuda" else [1024, 2048]
    sync = synchronizer(device)
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        # x @ W^T, nn.Linear's layout: every backbone matmul has it, and emulated-bf16 CPUs run the other
        # layout (a @ b) another 15x slower, which would understate the ceiling the backbone can reach.
        seconds = median_seconds(lambda a=a, b=b: a @ b.T, sync, warmup=3, repeats=10 if device.type == "cuda" else 5)
        per_size[n] = 2 * n**3 / seconds
        del a, b
    best = max(per_size, key=per_size.get)
    return {"flops_per_s": per_size[best], "best_size": best, "per_size": per_size}


def forward_flops(backbone, size: int, device: torch.device) -> int:
    """Counted FLOPs of one image's forward (math attention so QK^T and AV show up as matmuls)."""
    image = torch.randn(1, 3, size, size, device=device, dtype=torch.float32)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        backbone(image)
    return counter.get_total_flops()


def measure_row(name: str, size: int, batch: int, dtype_name: str, device: torch.device, peak: dict) -> dict:
    from dinov3ds.models.backbones import load_backbone

    backbone = load_backbone(name, "random", device=device, dtype=DTYPES[dtype_name])
    flops_per_image = forward_flops(backbone, size, device)
    images = torch.randn(batch, 3, size, size, device=device)
    sync = synchronizer(device)
    with torch.inference_mode():
        seconds = median_seconds(lambda: backbone(images), sync, warmup=3, repeats=10 if device.type == "cuda" else 3)
    achieved = flops_per_image * batch / seconds
    return {
        "variant": name, "size": size, "batch": batch, "dtype": dtype_name,
        "gflops_per_image": flops_per_image / 1e9, "seconds_per_batch": seconds,
        "images_per_s": batch / seconds, "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak["flops_per_s"], "fraction_of_peak": achieved / peak["flops_per_s"],
    }  # fmt: skip


def parse_row(text: str) -> tuple[str, int, int, str]:
    name, size, batch, dtype = text.split(":")
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}")
    return name, int(size), int(batch), dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", nargs="+", type=parse_row, help="variant:size:batch:dtype, e.g. vitl16:512:32:bfloat16")
    parser.add_argument("--name", default=None, help="results/<name>.json (default: flops_<device>)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")
    warnings.filterwarnings("ignore", message="backbone dtype")
    import logging

    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    from dinov3ds.models.hardware import native_support

    device = torch.device(args.device)
    rows_wanted = args.rows or (GPU_ROWS if device.type == "cuda" else CPU_ROWS)
    peaks: dict[str, dict] = {}
    rows = []
    for name, size, batch, dtype_name in rows_wanted:
        if dtype_name not in peaks:
            print(f"matmul peak {dtype_name} ...", file=sys.stderr, flush=True)
            peaks[dtype_name] = matmul_peak(DTYPES[dtype_name], device)
        print(f"{name} {size} bs{batch} {dtype_name} ...", file=sys.stderr, flush=True)
        row = measure_row(name, size, batch, dtype_name, device, peaks[dtype_name])
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous row's model is gone; give its blocks back before the next
        is_target = device.type == "cuda" and (name, size, batch, dtype_name) == GPU_TARGET
        row["verdict"] = ("PASS" if row["fraction_of_peak"] >= GPU_TARGET_FRACTION else "FAIL") if is_target else "-"
        rows.append(row)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    native = {d: native_support(DTYPES[d], device) for d in peaks}
    print(f"## Backbone forward vs measured matmul peak ({device_name})\n")
    print(markdown_table(
        ["dtype", "native", "matmul peak TFLOP/s", "best n"],
        [[d, native[d], round(p["flops_per_s"] / 1e12, 3), p["best_size"]] for d, p in peaks.items()],
    ))  # fmt: skip
    print()
    print(markdown_table(
        ["variant", "size", "batch", "dtype", "GFLOP/img", "img/s", "TFLOP/s", "% of peak", f">= {GPU_TARGET_FRACTION:.0%} (GPU target)"],
        [[r["variant"], r["size"], r["batch"], r["dtype"], round(r["gflops_per_image"], 1), round(r["images_per_s"], 1),
          round(r["achieved_flops_per_s"] / 1e12, 3), round(100 * r["fraction_of_peak"], 1), r["verdict"]] for r in rows],
    ))  # fmt: skip
    payload = {
        "device": str(device), "device_name": device_name, "target": {"row": GPU_TARGET, "fraction": GPU_TARGET_FRACTION},
        "matmul_peak": peaks, "native_support": native, "rows": rows,
    }  # fmt: skip
    path = write_result(args.name or f"flops_{device.type}", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
