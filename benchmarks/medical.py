"""Plain 2D vs 2.5D vs three-axis segmentation of CT phantoms: 3D Dice and HD95 per class on held-out cases.

The same tiny nnU-Net-layout CT dataset (nested organ + lesion phantoms in Hounsfield units, 1 x 1 x 2 mm
voxels, 12 training cases, 4 held out by `data.val_fraction`) is trained three times through the CLI with a
random-weight ViT-S/16 cut to a few blocks and a UNet head, then evaluated in 3D by `dinov3ds eval`:
  2d          axial slices, one channel repeated as R, G, B;
  2.5d        slices i-1, i, i+1 as R, G, B (`data.medical.context: 1`);
  three-axis  trained on slices along all three axes (`data.medical.axes: [0, 1, 2]`), predicted along all
              three and the probabilities averaged (`inference.volume_axes: [0, 1, 2]`).
A random backbone is far from DINOv3's features; what this compares is the modes, under one budget of
optimiser steps each. Official weights in checkpoints/ are not used, so the numbers are reproducible anywhere.

Run from the repository root: `python benchmarks/medical.py` (about 6 min on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

MODES = {
    "2d": [],
    "2.5d": ["data.medical.context=1"],
    "three-axis": ["data.medical.axes=[0, 1, 2]", "inference.volume_axes=[0, 1, 2]"],
}
COMMON = [
    "task=segmentation", "data.dataset=nnunet", "data.val_fraction=0.25", "data.image_size=64",
    "data.scale_range=[1.0, 1.0]", "data.photometric=false", "data.batch_size=16", "data.num_workers=0",
    "backbone.weights=random", "head.name=unet_sum", "head.options={base_channels: 32, image_channels: 8}",
    "optim.lr=3e-3", "loss.name=ce+dice", "trainer.progress_bar=false", "trainer.check_val_every_n_epoch=1000",
]  # fmt: skip


def run_mode(root: Path, work: Path, mode: str, epochs: int, depth: int) -> dict:
    from dinov3ds.cli import main

    run = work / mode
    overrides = [*COMMON, *MODES[mode], f"data.root={root}", f"trainer.max_epochs={epochs}",
                 f"backbone.overrides={{depth: {depth}}}", f"output_dir={run}"]  # fmt: skip
    started = time.perf_counter()
    if main(["train", *overrides]) != 0:
        sys.exit(f"training {mode} failed")
    trained = time.perf_counter()
    checkpoint = run / "checkpoints" / "last.ckpt"
    if main(["eval", "--checkpoint", str(checkpoint), "--out", str(run / "eval")]) != 0:
        sys.exit(f"evaluating {mode} failed")
    summary = json.loads((run / "eval" / "eval_metrics.json").read_text())
    summary["train_s"] = trained - started
    summary["eval_s"] = time.perf_counter() - trained
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per mode")
    parser.add_argument("--depth", type=int, default=4, help="ViT-S/16 blocks kept")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()

    from dinov3ds.data.synthetic import make_nnunet_dataset

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dinov3ds_medical_") as folder:
        root = make_nnunet_dataset(Path(folder) / "Dataset002_CTPhantom", training=16, test=0, modality="ct",
                                   shape=(64, 64, 32), spacing=(1.0, 1.0, 2.0))  # fmt: skip
        for mode in args.modes:
            results[mode] = run_mode(root, Path(folder), mode, args.epochs, args.depth)
            print(f"  {mode}: {json.dumps(results[mode]['per_class'])}", flush=True)

    rows = [
        [mode, summary["cases"]]
        + [round(summary["per_class"][name][key], 3) for name in ("organ", "lesion") for key in ("dice", "hd95")]
        + [round(summary["train_s"]), round(summary["eval_s"], 1)]
        for mode, summary in results.items()
    ]
    headers = ["mode", "cases", "Dice organ", "HD95 organ mm", "Dice lesion", "HD95 lesion mm", "train s", "eval s"]
    print(f"\nCT phantoms, vits16 ({args.depth} blocks, random) + unet_sum, {args.epochs} epochs each\n")
    print(markdown_table(headers, rows))
    path = write_result(
        "medical",
        {
            "model": f"vits16 depth {args.depth} (random weights) + unet_sum",
            "epochs": args.epochs,
            "results": results,
            "total_s": round(time.perf_counter() - started, 1),
        },
    )
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
