"""Images per second of one model three ways: PyTorch eager (float32), and its exported ONNX file in onnxruntime
in float32 and in float16 (`dinov3ds export --half`), at 224x224 and 512x512, on this machine's CPU.

The model is a full-size ViT-S/16 (random weights: speed does not depend on their values) with a segmentation
head (`linear` by default), exported by `dinov3ds.deploy.export_onnx` exactly as the CLI does (one file for
every size, parity checked at three sizes). Each cell is the best of three interleaved rounds (one warm-up
batch, then batches for a third of `--seconds`); PyTorch and onnxruntime both use every usable core. Also printed: the files' sizes and the parity figures.

On a CPU without native fp16 arithmetic (AVX512-FP16 / AMX-FP16, ARMv8.2 fp16) onnxruntime runs the fp16
file through casts and fp32 kernels, so it can be slower than fp32 there: the fp16 file is for GPUs
(CUDA / TensorRT execution providers); this script reports what it measures.

Run from the repository root: `python benchmarks/export_speed.py` (about 3 minutes on 2 cores);
`--sizes`, `--batch`, `--seconds`, `--head`, `--task classification`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import cpu_model, markdown_table, write_result  # noqa: E402

ROUNDS = 3


def build(task: str, head: str, image_size: int):
    """A full ViT-S/16 classifier or segmenter on seeded random weights."""
    from dinov3ds.config import load_config
    from dinov3ds.models.tasks import Classifier, Segmenter, backbone_from_config

    config = load_config(None, ["backbone.weights=random", f"task={task}", f"head.name={head}", "data.num_classes=3",
                                f"data.image_size={image_size}", "data.class_names=[a,b,c]"])  # fmt: skip
    model = (Classifier if task == "classification" else Segmenter)(backbone_from_config(config), 3, config, ["a", "b", "c"])
    return model.eval()


def rate(run, batch: np.ndarray, seconds: float) -> float:
    """Images per second of `run(batch)` after one warm-up call."""
    run(batch)
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        run(batch)
        count += 1
    return count * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per cell")
    parser.add_argument("--task", choices=["segmentation", "classification"], default="segmentation")
    parser.add_argument("--head", default="linear")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import onnxruntime

    from dinov3ds.deploy.onnx_export import export_onnx

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    model = build(args.task, args.head, max(args.sizes))
    sessions, exports = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("float32", "float16"):
            exports[precision] = export_onnx(model, Path(folder) / f"{precision}.onnx", half=precision == "float16")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = cores
            sessions[precision] = onnxruntime.InferenceSession(str(exports[precision].path), options,
                                                               providers=["CPUExecutionProvider"])  # fmt: skip
        sizes_mb = {p: exports[p].path.stat().st_size / 2**20 for p in exports}
        rows, record = [], []
        for side in args.sizes:
            batch = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(np.float32)

            def eager(images: np.ndarray) -> None:
                with torch.inference_mode():
                    model(torch.from_numpy(images))

            runs = {"pytorch": eager, **{p: (lambda images, s=s: s.run(None, {"images": images})) for p, s in sessions.items()}}
            speeds = dict.fromkeys(runs, 0.0)
            for _ in range(ROUNDS):  # interleaved, best of the rounds: a shared machine's load spreads over all three
                for name, run in runs.items():
                    speeds[name] = max(speeds[name], rate(run, batch, args.seconds / ROUNDS))
            rows.append([f"{side}x{side}", f"{speeds['pytorch']:.2f}", f"{speeds['float32']:.2f}", f"{speeds['float16']:.2f}",
                         f"{speeds['float32'] / speeds['pytorch']:.2f}", f"{speeds['float16'] / speeds['pytorch']:.2f}"])  # fmt: skip
            record.append({"size": side, "images_per_s": speeds})
    print(f"## Export speed: vits16 + {args.head} ({args.task}), batch {args.batch}, CPU {cpu_model()} ({cores} cores), "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print(markdown_table(["input", "PyTorch fp32 img/s", "ORT fp32 img/s", "ORT fp16 img/s", "fp32 / PyTorch",
                          "fp16 / PyTorch"], rows))  # fmt: skip
    print(f"\nfiles: fp32 {sizes_mb['float32']:.1f} MB, fp16 {sizes_mb['float16']:.1f} MB "
          f"({sizes_mb['float16'] / sizes_mb['float32']:.2f} of fp32)")  # fmt: skip
    for precision, result in exports.items():
        figures = ", ".join(f"{p.shape[2]}x{p.shape[3]} {p.probabilities:.1e}" for p in result.parity)
        print(f"parity {precision} (max |Δ probability| vs PyTorch fp32): {figures}")
    parity = {p: [vars(item) for item in result.parity] for p, result in exports.items()}
    path = write_result("export_speed", {"task": args.task, "head": args.head, "batch": args.batch, "cells": record,
                                         "file_mb": sizes_mb, "parity": parity})  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
