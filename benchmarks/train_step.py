"""Whole training step per segmentation head on vits16, next to the frozen backbone's forward alone.

One training step here is what `training.module.TaskModule` does per batch, without Lightning's bookkeeping: take the
next batch from the library's own training `DataLoader` (`training.trainer._loader` over `build_datasets`, with the
training transform: random scale, crop, flip, colour jitter), backbone under `no_grad`, head forward,
the configured loss (ce), backward, AdamW step, zero_grad. Per step it records the loader wait, the
backbone part and the rest (head forward + loss + backward + optimizer).

Separately, and alternating with the steps batch by batch, it times the backbone forward alone
(`Segmenter.features` on the same batch under `no_grad`). The head's share of a step is
the median over steps of (head forward + loss + backward + optimizer) / step time, both parts timed inside
the same step so a shared machine's load hits them alike. Acceptance: for the `linear` head, the backbone
part is >= 70 % of a training step (median over steps of backbone time / step time).

Run from the repository root: `python benchmarks/train_step.py` (512 px, batch 2, 3 timed steps per head
after one warm-up, data loading in the main process); `--quick` uses 256 px (what fits 4 min on 2 shared CPU
cores); `--size`, `--batch`, `--steps`, `--workers` to change.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import torch  # noqa: E402
from _common import markdown_table, write_result  # noqa: E402

LIMIT = 0.70


def sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits for the table (the JSON keeps full precision)."""
    return float(f"{value:.{digits}g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 px instead of 512 (a loaded CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; 256 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per head after one warm-up step")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--heads", nargs="+", help="default: every head in dinov3ds.heads.HEADS")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="train_step", help="results/<name>.json")
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 512)
    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)

    from dinov3ds.config import config_from_dict
    from dinov3ds.data.build import build_datasets
    from dinov3ds.data.synthetic import make_segmentation_folder
    from dinov3ds.heads import HEADS
    from dinov3ds.models.tasks import backbone_from_config, input_multiple
    from dinov3ds.training import trainer as engine
    from dinov3ds.training.module import TaskModule

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heads = args.heads or list(HEADS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dinov3ds-bench-") as tmp:
        count = args.batch * (args.steps + 1)
        root = make_segmentation_folder(Path(tmp) / "data", num_classes=args.classes, train=count, val=1,
                                        size=(args.size, args.size))  # fmt: skip
        backbone = None
        for head in heads:
            print(f"{head} ...", file=sys.stderr, flush=True)
            config = config_from_dict({
                "task": "segmentation",
                "output_dir": str(Path(tmp) / "out"),
                "backbone": {"name": "vits16", "weights": "random"},
                "data": {"dataset": "segmentation_folder", "root": str(root), "image_size": args.size,
                         "num_classes": args.classes, "batch_size": args.batch, "num_workers": args.workers},
                "head": {"name": head},
                "trainer": {"deterministic": True},  # no persistent workers: the loader is rebuilt per head
            })  # fmt: skip
            if backbone is None:  # one frozen backbone serves every head
                backbone = backbone_from_config(config, device)
            splits = build_datasets(config, backbone.mean, backbone.std, input_multiple(config, backbone))
            model = engine.build_model(config, splits.class_names, backbone).to(device)
            module = TaskModule(model, config, splits.class_names).to(device)
            module.train()
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                          lr=config.optim.lr, weight_decay=config.optim.weight_decay)  # fmt: skip
            loader = engine._loader(splits.train, config, batch_size=args.batch, train=True)
            batches = iter(loader)
            records = []
            for index in range(args.steps + 1):  # index 0 is the warm-up
                sync()
                start = time.perf_counter()
                images, target = next(batches)
                images, target = images.to(device), target.to(device)
                loaded = time.perf_counter()
                features = model.features(images)  # no_grad inside: the frozen backbone
                sync()
                backboned = time.perf_counter()
                loss = module.criterion(model.head(features, images), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                end = time.perf_counter()
                with torch.no_grad():  # the backbone alone, same batch, right after the step
                    sync()
                    alone_start = time.perf_counter()
                    model.features(images)
                    sync()
                    alone = time.perf_counter() - alone_start
                if index:
                    records.append({"step_s": end - start, "loader_s": loaded - start,
                                    "backbone_in_step_s": backboned - loaded, "head_opt_s": end - backboned,
                                    "backbone_only_s": alone})  # fmt: skip
            median = {key: statistics.median(r[key] for r in records) for key in records[0]}
            # Shares are medians of per-step ratios: both parts of one step see the same machine load.
            share = statistics.median(r["backbone_in_step_s"] / r["step_s"] for r in records)
            rows.append({
                "head": head,
                "trainable_parameters": model.head.trainable_parameters(),
                "step_images_per_s": args.batch / median["step_s"],
                "backbone_only_images_per_s": args.batch / median["backbone_only_s"],
                "backbone_share": share,
                "head_share": statistics.median(r["head_opt_s"] / r["step_s"] for r in records),
                "loader_share": statistics.median(r["loader_s"] / r["step_s"] for r in records),
                "backbone_only_over_step": statistics.median(r["backbone_only_s"] / r["step_s"] for r in records),
                "median_s": median,
                "steps": records,
            })  # fmt: skip
            print(f"  step {median['step_s']:.2f} s, backbone alone {median['backbone_only_s']:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            del module, model, optimizer, loader, batches

    linear = next((r for r in rows if r["head"] == "linear"), None)
    verdict = None if linear is None else ("PASS" if linear["backbone_share"] >= LIMIT else "FAIL")
    print(f"## Training step per head (vits16 random, full depth, {args.size} px, batch {args.batch}, "
          f"{args.device}, {args.workers} loader workers, median of {args.steps} steps)\n")  # fmt: skip
    print(markdown_table(
        ["head", "step img/s", "backbone-only img/s", "backbone share", "head+opt share", "loader share",
         "backbone-only / step"],
        [[r["head"], sig(r["step_images_per_s"]), sig(r["backbone_only_images_per_s"]),
          f"{100 * r['backbone_share']:.0f} %", f"{100 * r['head_share']:.0f} %", f"{100 * r['loader_share']:.0f} %",
          f"{100 * r['backbone_only_over_step']:.0f} %"] for r in rows],
    ))  # fmt: skip
    print("\nShares: medians over steps of each part's time / that step's time (backbone = Segmenter.features "
          "under no_grad inside the step; head+opt = head forward, loss, backward, AdamW). 'backbone-only / step': "
          "the backbone timed alone on the same batch right after each step, over that step's time.")
    if linear is not None:
        print(f"\nlinear head: backbone forward is {100 * linear['backbone_share']:.0f} % of a training step "
              f"(limit {100 * LIMIT:.0f} %) -> {verdict}")  # fmt: skip
    path = write_result(args.name, {
        "device": args.device,
        "settings": {**vars(args), "backbone": "vits16 random full depth",
                     "step": "loader next + backbone(no_grad) + head fwd + ce + backward + AdamW step"},
        "limit": LIMIT, "verdict": verdict, "rows": rows,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
