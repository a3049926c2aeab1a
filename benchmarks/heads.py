"""Segmentation heads on vits16: trainable parameters, forward+backward time per image, peak memory.

For each head in `dinov3ds.heads.HEADS` a fresh interpreter builds `Segmenter` around a full-size random
`vits16` and times the training computation the engine runs: backbone features under `no_grad` (the frozen
backbone keeps no activations), head forward, the task's loss (cross-entropy; Mask2Former's mask-classification
loss for pmt), backward. Timings per head:

* step: backbone (no_grad) + head forward + loss + backward, per image;
* head only: head forward + loss + backward on features computed beforehand, per image;
* the same head-only time with the head in `channels_last` (what the library uses on CUDA, where cuDNN's
  tensor-core convolutions are NHWC; on CPU it is measured too and decides nothing);
* inference: the backbone's forward (the taps) and the head's forward in eval mode, and their ratio.

The optimizer step is not included (see `train_step.py` for the whole step). Peak memory is measured around
the timed steps (warm-up included, so gradients count): on CPU the peak RSS above the RSS right before the
first step (`VmHWM` after resetting it through /proc/self/clear_refs); on GPU `torch.cuda.max_memory_allocated`
above the allocation before the first step.

Also printed:

* trainable parameters with ViT-S / B / L taps for every head and variant, next to the reference code's
  count where it has one (docs/heads.md says where each comes from);
* mIoU on the synthetic task: each head (default widths) trained through `dinov3ds train` for the same
  schedule on generated shapes (`make_segmentation_folder`, 32 train / 12 val images, 128 px) on a random
  2-block ViT-S/16. Random features make it a test of what a head can learn on its own from weak taps, not
  a ranking for pretrained backbones; it is the comparison the issue asked for (e.g. SegDINO paper vs
  upstream). `--no-miou` skips it.

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

# (label, head, options): every registered head with its defaults, plus each named variant.
VARIANTS = [("segdino (upstream)", "segdino", {"variant": "upstream"})]
# The reference code's trainable parameters for ViT-S / B / L taps (docs/heads.md), and the class count
# they were given for.
REFERENCE_COUNTS = {
    "segdino": (1, {"S": 2_213_793}),
    "segdino (upstream)": (1, {"S": 2_475_937}),
    "unet": (1, {"S": 2_377_081, "B": 9_502_705, "L": 16_891_201}),
    "fapm": (2, {"S": 6_194_948, "B": 13_182_020, "L": 19_969_988}),
    "pmt": (150, {"L": 53_850_263}),
}
WIDTHS = {"S": 384, "B": 768, "L": 1024}


def sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits for the table (the JSON keeps full precision)."""
    return float(f"{value:.{digits}g}")


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(
    head: str, options: dict, size: int, batch: int, iters: int, device_name: str, classes: int
) -> dict:
    """Runs in a fresh interpreter: one head, returns its numbers."""
    import logging
    import warnings

    import torch

    from dinov3ds.config import config_from_dict
    from dinov3ds.models.tasks import Segmenter, backbone_from_config
    from dinov3ds.training.tasks import task_for

    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = config_from_dict({
        "task": "segmentation",
        "backbone": {"name": "vits16", "weights": "random"},
        "data": {"dataset": "segmentation_folder", "image_size": size, "num_classes": classes},
        "head": {"name": head, "options": options},
    })  # fmt: skip
    backbone = backbone_from_config(config, device)
    model = Segmenter(backbone, classes, config, [f"class_{i}" for i in range(classes)]).to(device)
    model.train()  # the backbone stays in eval mode (Backbone.train)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    target = torch.randint(0, classes, (batch, size, size), generator=generator).to(device)
    criterion = task_for(config, model.class_names).criterion.to(device)  # pmt: the mask-classification loss
    trainable = model.head.trainable_parameters()

    def step() -> None:
        model.train()
        loss = criterion(model(images), target)  # Segmenter.features runs the backbone under no_grad
        loss.backward()

    with torch.no_grad():
        features = model.features(images)

    def head_only() -> None:
        model.train()
        loss = criterion(model.head(features, images), target)
        loss.backward()

    # The same head in channels_last (what `place_model` does on CUDA), on the same features.
    head_cl = copy.deepcopy(model.head).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    def head_only_channels_last() -> None:
        head_cl.train()
        loss = criterion(head_cl(features, images_cl), target)
        loss.backward()

    @torch.no_grad()
    def backbone_forward() -> None:  # inference: what the head's forward is compared with
        model.features(images)

    @torch.no_grad()
    def head_forward() -> None:
        model.eval().head(features, images)

    # Memory: reset the high-water mark, then warm-up + timed steps.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        baseline = _proc_status("VmRSS")
    runs = {"step": (step, model), "head": (head_only, model), "head_cl": (head_only_channels_last, head_cl),
            "backbone_fwd": (backbone_forward, model), "head_fwd": (head_forward, model)}

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
        "backbone_forward_ms_per_image": 1000 * statistics.median(times["backbone_fwd"]) / batch,
        "head_forward_ms_per_image": 1000 * statistics.median(times["head_fwd"]) / batch,
        "peak_memory_mib": (peak - baseline) / 2**20,
        "memory_kind": "cuda max_memory_allocated delta" if cuda else "peak RSS delta (VmHWM)",
    }


def head_runs(names: list[str] | None) -> list[tuple[str, str, dict]]:
    """(label, head, options) for the heads asked for (default: all) and their named variants."""
    from dinov3ds.heads import HEADS

    runs = [(name, name, {}) for name in HEADS] + VARIANTS
    return [run for run in runs if names is None or run[0] in names or run[1] in names]


def parameter_counts(runs: list[tuple[str, str, dict]]) -> list[dict]:
    """Trainable parameters with four ViT-S / B / L taps, at the class count of the reference's numbers."""
    import logging

    from dinov3ds.heads import TokenSource, build_head

    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    rows = []
    for label, head, options in runs:
        classes, reference = REFERENCE_COUNTS.get(label, (1, {}))
        ours = {size: build_head(head, [width] * 4, [16] * 4, classes, TokenSource(width // 64, 5, True, None),
                                 **options).trainable_parameters()
                for size, width in WIDTHS.items()}  # fmt: skip
        rows.append({"head": label, "classes": classes, "ours": ours, "reference": reference})
    return rows


def synthetic_miou(head: str, options: dict, epochs: int) -> dict:
    """Runs in a fresh interpreter: `dinov3ds train` on generated shapes, returns the final val mIoU."""
    import tempfile

    from dinov3ds.cli import main as cli_main
    from dinov3ds.data.synthetic import make_segmentation_folder

    with tempfile.TemporaryDirectory() as tmp:
        data = make_segmentation_folder(Path(tmp) / "data", num_classes=3, train=32, val=12, size=(128, 128))
        run = Path(tmp) / "run"
        start = time.perf_counter()
        code = cli_main([
            "train", "task=segmentation", "backbone.weights=random", "backbone.overrides={depth: 2}",
            f"head.name={head}", f"head.options={json.dumps(options)}", "data.dataset=segmentation_folder",
            f"data.root={data}", "data.num_classes=3", "data.image_size=128", "data.scale_range=[1.0, 1.0]", "data.photometric=false",
            "data.num_workers=0", "data.batch_size=4", "optim.lr=1e-3", f"trainer.max_epochs={epochs}",
            f"trainer.check_val_every_n_epoch={epochs}", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.progress_bar=false", f"output_dir={run}",
        ])  # fmt: skip
        seconds = time.perf_counter() - start
        if code:
            raise RuntimeError(f"dinov3ds train exited {code}")
        metrics = json.loads((run / "val_metrics.json").read_text())
    return {"mIoU": metrics["mIoU"], "epochs": epochs, "train_s": seconds}


def run_child(arguments: list[str]) -> dict:
    """This script in a fresh interpreter (clean memory high-water mark, no state shared between heads)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px instead of 512 (a loaded CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; 256 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument(
        "--heads", nargs="+", help="default: every head in dinov3ds.heads.HEADS and its variants"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--epochs", type=int, default=15, help="synthetic-task training epochs (8 steps each)"
    )
    parser.add_argument("--no-miou", action="store_true", help="skip the synthetic-task mIoU runs")
    parser.add_argument("--name", default="heads", help="results/<name>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--miou-child", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 512)
    options = json.loads(args.options)

    if args.child:
        print(
            json.dumps(
                child(args.child, options, args.size, args.batch, args.iters, args.device, args.classes)
            )
        )
        return
    if args.miou_child:
        print(json.dumps(synthetic_miou(args.miou_child, options, args.epochs)))
        return

    import torch
    from _common import markdown_table, write_result

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = head_runs(args.heads)
    rows = []
    for label, head, head_options in runs:
        print(f"{label} ...", file=sys.stderr, flush=True)
        row = {"head": label, "options": head_options}
        row.update(run_child(["--child", head, "--options", json.dumps(head_options), "--size", str(args.size),
                              "--batch", str(args.batch), "--iters", str(args.iters), "--classes", str(args.classes),
                              "--device", device]))  # fmt: skip
        if not args.no_miou:
            row["synthetic"] = run_child(["--miou-child", head, "--options", json.dumps(head_options),
                                          "--epochs", str(args.epochs)])  # fmt: skip
        row["head"] = label
        rows.append(row)

    def miou(row: dict) -> object:
        synthetic = row.get("synthetic", {})
        return round(synthetic["mIoU"], 3) if "mIoU" in synthetic else synthetic.get("error", "")

    table = [
        [r["head"], f"{r['trainable_parameters']:,}", sig(r["step_ms_per_image"]), sig(r["head_only_ms_per_image"]),
         sig(r["head_only_channels_last_ms_per_image"]),
         sig(r["head_only_ms_per_image"] / r["head_only_channels_last_ms_per_image"]), sig(r["peak_memory_mib"]),
         sig(r["backbone_forward_ms_per_image"]), sig(r["head_forward_ms_per_image"]),
         sig(r["head_forward_ms_per_image"] / r["backbone_forward_ms_per_image"]), miou(r)]
        if "error" not in r else [r["head"], "error", r["error"], "", "", "", "", "", "", "", miou(r)]
        for r in rows
    ]  # fmt: skip
    mem = "peak GPU memory MiB" if device.startswith("cuda") else "peak RSS delta MiB"
    print(f"## Segmentation heads on vits16 (random, full depth), {args.size}x{args.size}, batch {args.batch}, "
          f"{args.classes} classes, {device}, median of {args.iters} iterations"
          + ("" if args.no_miou else f"; synthetic-task mIoU after {args.epochs} epochs") + "\n")  # fmt: skip
    print(markdown_table(
        ["head", "trainable params", "step fwd+bwd ms/img", "head-only fwd+bwd ms/img",
         "channels_last head-only ms/img", "channels_last speed-up", mem, "backbone fwd ms/img",
         "head fwd ms/img", "head fwd ÷ backbone fwd", "synthetic mIoU"], table
    ))  # fmt: skip
    counts = parameter_counts(runs)
    print(
        "\n## Trainable parameters with four ViT taps (S / B / L: width 384 / 768 / 1024), ours vs reference\n"
    )
    print(markdown_table(
        ["head", "classes", *(f"ViT-{size}" for size in WIDTHS), *(f"reference {size}" for size in WIDTHS)],
        [[c["head"], c["classes"], *(f"{c['ours'][size]:,}" for size in WIDTHS),
          *(f"{c['reference'][size]:,}" if size in c["reference"] else "" for size in WIDTHS)] for c in counts],
    ))  # fmt: skip
    path = write_result(args.name, {
        "device": device,
        "settings": {"backbone": "vits16 random full depth", "size": args.size, "batch": args.batch,
                     "iters": args.iters, "classes": args.classes,
                     "step": "backbone under no_grad + head forward + cross-entropy + backward (no optimizer)",
                     "synthetic": None if args.no_miou else
                     f"dinov3ds train, random 2-block vits16, 3 classes, 32/12 images of 128 px, batch 4, "
                     f"AdamW 1e-3, {args.epochs} epochs"},
        "heads": rows,
        "parameters": counts,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
