"""Speed and peak memory of volume inference (`predict_volume`): 2D, 2.5D and three-axis, as depth grows.

`predict_volume` promises that memory holds the input, the outputs and one batch of slices, whatever the
depth. This measures it with a real `Segmenter` (random-weight ViT-S/16 cut to 2 blocks, UNet head) fed by
the slice predictor `dinov3ds predict` uses, on head phantoms of 128 x 128 slices and 64, 128 and 256
slices along axis 2, in three modes:
  2d          axial slices, one channel repeated as R, G, B;
  2.5d        axial slices i-1, i, i+1 as R, G, B (`data.medical.context: 1`);
  three-axis  slices along all three axes, probabilities averaged (`inference.volume_axes: [0, 1, 2]`).
Outputs are the uint8 label volume, plus for three-axis the float32 [K, X, Y, Z] probability accumulator.
"slices/s" counts every slice the model saw (three-axis sees X + Y + Z of them).

Each depth runs in a fresh interpreter. Baseline = RSS after the model is built and the input volume is in
memory, plus the bytes the output arrays will take (`np.zeros` maps them lazily and inference fills them). The peak high-water mark is reset after the baseline
(`/proc/self/clear_refs`), so "peak beyond baseline" is what inference itself adds: one batch of slices,
activations and allocator slack. It must stay flat: within 10 % of the shallowest volume's at every depth.

Allocator: the children run with a fixed glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`, `--malloc
fixed`), so a freed activation goes back to the OS and RSS follows what the code holds. With glibc's default
dynamic threshold (`--malloc default`) the heap fragments differently from run to run and the peak wanders by
tens of MiB in either direction with the number of batches (seen, 64 → 256 slices: +23 % with glibc's
defaults, -27 % with MALLOC_ARENA_MAX=1 and one thread), which is allocator noise, not memory that grows
with depth.

Run from the repository root: `python benchmarks/volume.py` (about 8 min on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

MODES = ("2d", "2.5d", "three-axis")
TOLERANCE = 0.10  # peak beyond baseline may grow at most this fraction over the shallowest volume's

# Runs in a fresh interpreter; prints one JSON line. argv: volume .npy, threads, batch size.
CHILD = r"""
import gc, json, sys, time
import numpy as np
import torch

def status():
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False

path, threads, batch_size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
from dinov3ds.config import config_from_dict
from dinov3ds.models.tasks import Segmenter, backbone_from_config
from dinov3ds.commands.volumes import slice_predictor
from dinov3ds.models.volume_inference import predict_volume

axes = [0, 1, 2] if mode == "three-axis" else [2]
config = config_from_dict({
    "task": "segmentation",
    "backbone": {"name": "vits16", "weights": "random", "overrides": {"depth": 2}},
    "data": {"class_names": ["background", "head"], "medical": {"context": 1 if mode == "2.5d" else 0}},
    "head": {"name": "unet"},
    "inference": {"volume_batch_size": batch_size},
})
model = Segmenter(backbone_from_config(config), 2, config, ["background", "head"]).eval()
volume = np.load(path)  # float32, read straight into one array
outputs = volume.size * np.dtype(np.uint8).itemsize  # the label volume
if len(axes) > 1:
    outputs += 2 * volume.size * np.dtype(np.float32).itemsize  # the [K, X, Y, Z] probability accumulator
gc.collect()
baseline_rss = status()["VmRSS"]
peak_reset = reset_peak()
start = time.perf_counter()
labels, _ = predict_volume(
    volume, slice_predictor(model), options=config.data.medical, num_classes=2, axes=axes,
    batch_size=batch_size, progress=False,
)
seconds = time.perf_counter() - start
after = status()
if not peak_reset:  # no clear_refs: ru_maxrss also counts model construction, so this overstates
    import resource
    after["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert labels.shape == volume.shape
print(json.dumps({
    "shape": list(volume.shape),
    "input_bytes": int(volume.nbytes),
    "output_bytes": int(outputs),
    "baseline_rss_bytes": baseline_rss,
    "baseline_bytes": baseline_rss + outputs,
    "peak_bytes": after["VmHWM"],
    "end_rss_bytes": after["VmRSS"],
    "peak_reset": peak_reset,
    "seconds": seconds,
    "slices": int(sum(volume.shape[a] for a in axes)),
    "slices_per_s": sum(volume.shape[a] for a in axes) / seconds,
    "volume_slices_per_s": volume.shape[2] / seconds,
    "foreground_fraction": float(labels.mean()),
}))
"""


def _env(malloc: str, threads: int) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return env


def write_volume(folder: Path, size: int, depth: int) -> Path:
    """A head phantom of size x size x depth as a float32 .npy (made here, so the child has no transients)."""
    from dinov3ds.data.synthetic import make_head_phantom

    image, _ = make_head_phantom((size, size, depth), seed=depth, spacing=(1.0, 1.0, 1.0))
    path = folder / f"phantom_{size}x{size}x{depth}.npy"
    np.save(path, np.asarray(image.dataobj, dtype=np.float32))
    return path


def measure(volume: Path, threads: int, batch_size: int, malloc: str, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(volume), str(threads), str(batch_size), mode],
        cwd=ROOT,
        env=_env(malloc, threads),
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"{volume.name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="slice side in pixels")
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 128, 256], help="slices per volume")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="slices per forward (inference.volume_batch_size)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument(
        "--malloc",
        choices=["fixed", "default"],
        default="fixed",
        help="glibc mmap threshold in the children: fixed 64 KiB (default) or glibc's dynamic one",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="inference modes")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, dict[int, dict]] = {mode: {} for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="dinov3ds_volume_") as folder:
        volumes = {depth: write_volume(Path(folder), args.size, depth) for depth in sorted(args.depths)}
        for mode in args.modes:
            for depth, volume in volumes.items():
                measured = measure(volume, args.threads, args.batch_size, args.malloc, mode)
                measured["extra_bytes"] = measured["peak_bytes"] - measured["baseline_bytes"]
                results[mode][depth] = measured
                print(f"  {mode}, {depth} slices: {measured['slices_per_s']:.1f} slices/s, peak beyond baseline "
                      f"{measured['extra_bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip

    for by_depth in results.values():
        reference = by_depth[min(by_depth)]["extra_bytes"]
        for measured in by_depth.values():
            measured["ratio_to_shallowest"] = measured["extra_bytes"] / reference if reference > 0 else float("nan")
            measured["check"] = "PASS" if measured["extra_bytes"] <= reference * (1 + TOLERANCE) else "FAIL"
    checks = [m["check"] for by_depth in results.values() for m in by_depth.values()]
    verdict = "PASS" if all(check == "PASS" for check in checks) else "FAIL"

    mib = 2**20
    rows = [
        [
            mode,
            f"{args.size}x{args.size}x{depth}",
            round(m["input_bytes"] / mib, 1),
            round(m["output_bytes"] / mib, 1),
            round(m["peak_bytes"] / mib, 1),
            round(m["extra_bytes"] / mib, 1),
            round(m["ratio_to_shallowest"], 3),
            round(m["slices_per_s"], 1),
            round(m["seconds"], 1),
            m["check"],
        ]
        for mode, by_depth in results.items()
        for depth, m in by_depth.items()
    ]
    headers = [
        "mode", "volume", "input MiB", "outputs MiB", "peak MiB", "peak−baseline MiB", "÷ shallowest",
        "slices/s", "seconds", "check",
    ]  # fmt: skip
    print(
        f"\npredict_volume, vits16 (2 blocks, random) + unet, batch {args.batch_size}, {args.threads} threads, "
        f"malloc {args.malloc}\n"
    )
    print(markdown_table(headers, rows))
    print(f"\npeak beyond baseline flat within {TOLERANCE:.0%} as depth grows, every mode: {verdict}")
    path = write_result(
        "volume",
        {
            "model": "vits16 depth 2 (random weights) + unet head, 2 classes",
            "slice_size": args.size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "malloc": args.malloc,
            "tolerance": TOLERANCE,
            "check": verdict,
            "results": {mode: {str(d): m for d, m in by_depth.items()} for mode, by_depth in results.items()},
            "total_s": round(time.perf_counter() - started, 1),
        },
    )
    print(f"wrote {path.relative_to(ROOT)}")
    return 0 if verdict == "PASS" else 1

if __name__ == "__main__":
    sys.exit(main())
