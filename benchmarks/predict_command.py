"""`dinov3ds predict` as a user runs it, start-up included: the default dtype against `--float32` on a folder.

Issue 38's measure of done: on a CPU that computes bf16 natively, predict on a folder of photos by default
(`dtype: auto` picks bf16 there) is >= 1.8x faster than with `--float32`, with the same top-1 labels. Each
round runs the command once each way in a fresh process (order flipped each round), with the classification
and the segmentation checkpoints of `predict.py` (random full-depth ViT-S/16, heads trained one epoch). A
one-photo run of each gives the fixed cost (start-up, model load) that a folder's speed-up is diluted by.

Run from the repository root: `python benchmarks/predict_command.py` (about 5 minutes on 2 cores);
`--images`, `--repeats`.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402
from predict import TASKS, cpu_line, make_photos, train_checkpoint  # noqa: E402

TARGET = 1.8


def run_predict(checkpoint: Path, inputs: list[Path], out: Path, float32: bool) -> float:
    """Seconds of one `dinov3ds predict` process, from its start to its exit."""
    command = [sys.executable, "-m", "dinov3ds", "predict", "--checkpoint", str(checkpoint), *map(str, inputs),
               "--out", str(out), "--overwrite", "--device", "cpu", *(["--float32"] if float32 else [])]  # fmt: skip
    # this checkout's code; the CPU's own dtype choice (a DINOV3DS_CPU_BF16 pin left in the shell is dropped)
    env = {k: v for k, v in os.environ.items() if k != "DINOV3DS_CPU_BF16"} | {"PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"predict failed: {done.stderr[-2000:]}")
    return seconds


def top1(out: Path) -> list[str]:
    with open(out / "predictions.csv", newline="") as handle:
        return [row["label"] for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--name", default="predict_command", help="results/<name>.json")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images: at least 2 (the one-photo run is the baseline a folder is compared with)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", args.images)
        for task in TASKS:
            checkpoint = train_checkpoint(work, task)
            seconds: dict[str, list[float]] = {"default": [], "float32": [], "default, 1 photo": [], "float32, 1 photo": []}
            for round_ in range(args.repeats):
                for name in list(seconds)[:: 1 if round_ % 2 == 0 else -1]:
                    inputs = photos[:1] if "1 photo" in name else [work / "photos"]
                    out = work / f"out_{task}_{name.replace(', ', '_').replace(' ', '')}"
                    seconds[name].append(run_predict(checkpoint, inputs, out, float32=name.startswith("float32")))
                    print(f"{task} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr, flush=True)
            middle = {name: statistics.median(values) for name, values in seconds.items()}
            row = {"task": task, "images": args.images, "seconds": seconds, "median_s": middle,
                   "speedup": middle["float32"] / middle["default"],
                   "speedup_after_start": (middle["float32"] - middle["float32, 1 photo"])
                   / (middle["default"] - middle["default, 1 photo"])}  # fmt: skip
            if task == "classification":
                row["same_top1"] = top1(work / "out_classification_default") == top1(work / "out_classification_float32")
            rows.append(row)
    cpu = cpu_line()
    print(f"## dinov3ds predict on a folder of {args.images} JPEG photos 500x375, default dtype vs --float32, "
          f"vits16 (random, full depth); CPU: {cpu}\n")  # fmt: skip
    print(markdown_table(
        ["task", "default s", "--float32 s", "speed-up", "target", "1 photo: default s", "1 photo: --float32 s",
         "speed-up past the 1-photo run", "same top-1"],
        [[r["task"], round(r["median_s"]["default"], 1), round(r["median_s"]["float32"], 1), round(r["speedup"], 2),
          f"{TARGET} {'met' if r['speedup'] >= TARGET else 'MISSED'}", round(r["median_s"]["default, 1 photo"], 1),
          round(r["median_s"]["float32, 1 photo"], 1), round(r["speedup_after_start"], 2),
          r.get("same_top1", "n/a")] for r in rows],
    ))  # fmt: skip
    path = write_result(args.name, {"cpu_line": cpu, "target": TARGET, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
