"""Segmentation heads on vits16: trainable parameters, forward+backward time per image, peak memory.

For each head in `dinov3ds.heads.HEADS` a fresh interpreter builds `Segmenter` around a full-size random
`vits16` and times the training computation the engine runs: backbone features under `no_grad` (the frozen
backbone keeps no activations), head forward, cross-entropy, backward. Two timings per head:

* step: backbone (no_grad) + head forward + loss + backward, per image;
* head only: head forward + loss + backward on features computed beforehand, per image;
* the same head-only time with the head in `channels_last` (what the library uses on CUDA, where cuDNN's
  tensor-core convolutions are NHWC; on CPU it is measured too and decides nothing).

The optimizer step is not included (see `train_step.py` for the whole step). Peak memory is measured around
the timed steps (warm-up included, so gradients count): on CPU the peak RSS above the RSS right before the
first step (`VmHWM` after resetting it through /proc/self/clear_refs); on GPU `torch.cuda.max_memory_allocated`
above the allocation before the first step.

Also printed: FAPM trainable parameters with 2 classes for vits16/vitb16/vitl16 taps against the Dino U-Net
paper's ~5 / ~11 / ~18 M.

Run from the repository root: `python benchmarks/heads.py` (512x512, batch 2, 2 timed iterations after one
warm-up); `--quick` uses 256x256 (what fits 4 min on 2 shared CPU cores); `--size`, `--batch`, `--iters`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

PAPER_FAPM_M = {"vits16": 5, "vitb16": 11, "vitl16": 18}


def sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits for the table (the JSON keeps full precision)."""
    return float(f"{value:.{digits}g}")


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(head: str, size: int, batch: int, iters: int, device_name: str, classes: int) -> dict:
    """Runs in a fresh interpreter: one head, returns its numbers."""
    import logging
    import warnings

    import torch

    from dinov3ds.config import config_from_dict
    from dinov3ds.models.tasks import Segmenter, backbone_from_config

    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = config_from_dict({
        "task": "segmentation",
        "backbone": {"name": "vits16", "weights": "random"},
        "data": {"dataset": "segmentation_folder", "image_size": size, "num_classes": classes},
        "head": {"name": head},
    })  # fmt: skip
    backbone = backbone_from_config(config, device)
    model = Segmenter(backbone, classes, config, [f"class_{i}" for i in range(classes)]).to(device)
    model.train()  # the backbone stays in eval mode (Backbone.train)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    target = torch.randint(0, classes, (batch, size, size), generator=generator).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    trainable = model.head.trainable_parameters()

    def step() -> None:
        loss = criterion(model(images), target)  # Segmenter.features runs the backbone under no_grad
        loss.backward()

    with torch.no_grad():
        features = model.features(images)

    def head_only() -> None:
        loss = criterion(model.head(features, images), target)
        loss.backward()

    # The same head in channels_last (what `place_model` does on CUDA), on the same features.
    head_cl = copy.deepcopy(model.head).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def head_only_channels_last() -> None:
        loss = criterion(head_cl(features, images_cl), target)
        loss.backward()

    # Memory: reset the high-water mark, then warm-up + timed steps.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        baseline = _proc_status("VmRSS")
    runs = {"step": (step, model), "head": (head_only, model), "head_cl": (head_only_channels_last, head_cl)}

    def timed(name: str) -> float:
        """Seconds of one run (device synchronised), gradients cleared afterwards."""
        run, owner = runs[name]
        sync()
        start = time.perf_counter()
        run()
        sync()
        seconds = time.perf_counter() - start
        owner.zero_grad(set_to_none=False)
        return seconds

    for name in runs:  # warm-up
        timed(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):  # alternate the measurements
        for name in runs:
            times[name].append(timed(name))
    step_times, head_times, head_cl_times = times["step"], times["head"], times["head_cl"]
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status("VmHWM")
    return {
        "head": head,
        "trainable_parameters": trainable,
        "step_s": step_times,
        "head_only_s": head_times,
        "step_ms_per_image": 1000 * statistics.median(step_times) / batch,
        "head_only_ms_per_image": 1000 * statistics.median(head_times) / batch,
        "head_only_channels_last_s": head_cl_times,
        "head_only_channels_last_ms_per_image": 1000 * statistics.median(head_cl_times) / batch,
        "peak_memory_mib": (peak - baseline) / 2**20,
        "memory_kind": "cuda max_memory_allocated delta" if cuda else "peak RSS delta (VmHWM)",
    }


def fapm_counts() -> list[dict]:
    import logging

    from dinov3ds.heads import HEADS, build_head
    from dinov3ds.models.variants import get_spec

    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    if "fapm" not in HEADS:
        return []
    rows = []
    for name, paper in PAPER_FAPM_M.items():
        spec = get_spec(name)
        head = build_head("fapm", [spec.embed_dim] * 4, [16] * 4, 2)
        rows.append({"backbone": name, "embed_dim": spec.embed_dim, "parameters": head.trainable_parameters(),
                     "paper_m": paper})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px instead of 512 (a loaded CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; 256 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--heads", nargs="+", help="default: every head in dinov3ds.heads.HEADS")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--name", default="heads", help="results/<name>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 512)

    if args.child:
        print(json.dumps(child(args.child, args.size, args.batch, args.iters, args.device, args.classes)))
        return

    import torch
    from _common import markdown_table, write_result

    from dinov3ds.heads import HEADS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    heads = args.heads or list(HEADS)
    rows = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for head in heads:
        print(f"{head} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", head, "--size", str(args.size), "--batch", str(args.batch),
                   "--iters", str(args.iters), "--classes", str(args.classes), "--device", device]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            rows.append({"head": head, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    table = [
        [r["head"], f"{r['trainable_parameters']:,}", sig(r["step_ms_per_image"]), sig(r["head_only_ms_per_image"]),
         sig(r["head_only_channels_last_ms_per_image"]),
         sig(r["head_only_ms_per_image"] / r["head_only_channels_last_ms_per_image"]), sig(r["peak_memory_mib"])]
        if "error" not in r else [r["head"], "error", r["error"], "", "", "", ""]
        for r in rows
    ]  # fmt: skip
    mem = "peak GPU memory MiB" if device.startswith("cuda") else "peak RSS delta MiB"
    print(f"## Segmentation heads on vits16 (random, full depth), {args.size}x{args.size}, batch {args.batch}, "
          f"{args.classes} classes, {device}, median of {args.iters} iterations\n")  # fmt: skip
    print(markdown_table(
        ["head", "trainable params", "step fwd+bwd ms/img", "head-only fwd+bwd ms/img",
         "channels_last head-only ms/img", "channels_last speed-up", mem], table
    ))  # fmt: skip
    counts = fapm_counts()
    if counts:
        print("\n## FAPM (Dino U-Net) trainable parameters, 2 classes\n")
        print(markdown_table(
            ["backbone", "embed dim", "parameters (M)", "paper (M)"],
            [[c["backbone"], c["embed_dim"], round(c["parameters"] / 1e6, 2), f"~{c['paper_m']}"] for c in counts],
        ))  # fmt: skip
    path = write_result(args.name, {
        "device": device,
        "settings": {"backbone": "vits16 random full depth", "size": args.size, "batch": args.batch,
                     "iters": args.iters, "classes": args.classes,
                     "step": "backbone under no_grad + head forward + cross-entropy + backward (no optimizer)"},
        "heads": rows,
        "fapm_parameters": counts,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
