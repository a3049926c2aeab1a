"""Linear probe: per-epoch time of cached versus uncached training, through `dinov3ds.training.trainer.train`.

Both runs use the library's own path on the same generated data: task classification, `data.augment: false`,
full-size `vits16` with random weights at 224, only `cache_features` differs. With the cache, the frozen
backbone runs once over the data (timed separately, as "extraction") and every epoch trains the linear head
on stored vectors; without it, every epoch runs the backbone on every image.

Epoch time is measured by a Lightning callback from `on_train_epoch_start` to the last `on_train_batch_end`
(the training part of the epoch: data loading, forward, backward, optimizer; validation is reported
separately). Uncached and cached runs alternate, round by round; each run's first epoch is a warm-up and is
left out of the medians. Acceptance: the cached epoch is >= 20x faster.

Run from the repository root: `python benchmarks/linear_probe.py` (quick default: 32 training images,
2 rounds, < 4 min on 2 CPU cores); `--train-per-class`, `--rounds`, `--epochs` for bigger runs.
"""

from __future__ import annotations

import argparse
import logging
import os
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
from lightning.pytorch.callbacks import Callback  # noqa: E402

LIMIT = 20.0


def sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits for the table (the JSON keeps full precision)."""
    return float(f"{value:.{digits}g}")


class EpochTimer(Callback):
    """Training-part seconds of each epoch, and validation seconds."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.validation: list[float] = []
        self._start = self._last = self._val_start = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self._last = time.perf_counter()

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.train.append(self._last - self._start)
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, module) -> None:
        self.validation.append(time.perf_counter() - self._val_start)


def run(data_root: Path, output: Path, *, cached: bool, epochs: int, batch_size: int, workers: int) -> dict:
    """One `engine.train` run; returns epoch times and the feature-extraction (or cache-load) time."""
    import lightning.pytorch as L

    from dinov3ds.config import config_from_dict
    from dinov3ds.training import trainer as engine

    config = config_from_dict({
        "task": "classification",
        "output_dir": str(output),
        "cache_features": cached,
        "backbone": {"name": "vits16", "weights": "random"},
        "data": {"dataset": "image_folder", "root": str(data_root), "image_size": 224, "augment": False,
                 "batch_size": batch_size, "num_workers": workers},
        "head": {"name": "linear"},
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "progress_bar": False,
                    "log_every_n_steps": 1000},
    })  # fmt: skip
    timer = EpochTimer()
    extraction: list[float] = []
    original_features, original_trainer = engine.cached_features, engine.build_trainer

    def timed_features(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_features(*args, **kwargs)
        finally:
            extraction.append(time.perf_counter() - start)

    def trainer_with_timer(*args, **kwargs) -> L.Trainer:
        trainer = original_trainer(*args, **kwargs)
        trainer.callbacks.append(timer)
        return trainer

    engine.cached_features, engine.build_trainer = timed_features, trainer_with_timer
    try:
        start = time.perf_counter()
        result = engine.train(config)
        total = time.perf_counter() - start
    finally:
        engine.cached_features, engine.build_trainer = original_features, original_trainer
    return {
        "cached": cached, "epoch_s": timer.train, "validation_s": timer.validation,
        "extraction_s": sum(extraction), "total_s": total, "val_top1": result.metrics.get("val/top1"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default sizes (kept for run_all)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=8, help="training images per class (32 in all)")
    parser.add_argument("--val-per-class", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: loading in the main process)")
    parser.add_argument("--rounds", type=int, default=2, help="uncached/cached run pairs")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per uncached run (cached runs: +1)")
    parser.add_argument("--name", default="linear_probe", help="results/<name>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("dinov3ds", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from dinov3ds.data.synthetic import make_classification_folder

    with tempfile.TemporaryDirectory(prefix="dinov3ds-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["DINOV3DS_CACHE"] = str(tmp / "cache")  # a cold cache: the first cached run extracts
        data = make_classification_folder(
            tmp / "data", num_classes=args.classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, size=224,
        )  # fmt: skip
        runs = []
        for round_index in range(args.rounds):
            for cached in (False, True):
                label = "cached" if cached else "uncached"
                print(f"round {round_index + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                epochs = args.epochs + 1 if cached else args.epochs
                outcome = run(data, tmp / f"run{round_index}_{label}", cached=cached, epochs=epochs,
                              batch_size=args.batch_size, workers=args.workers)  # fmt: skip
                outcome["round"] = round_index
                runs.append(outcome)
                print(f"  epochs {[round(t, 3) for t in outcome['epoch_s']]}", file=sys.stderr, flush=True)

    def steady(cached: bool) -> list[float]:  # every run's first epoch is a warm-up
        return [t for r in runs if r["cached"] == cached for t in r["epoch_s"][1:]]

    uncached_s, cached_s = statistics.median(steady(False)), statistics.median(steady(True))
    ratio = uncached_s / cached_s
    round_ratios = [
        statistics.median(u["epoch_s"][1:]) / statistics.median(c["epoch_s"][1:])
        for u, c in zip(runs[0::2], runs[1::2])
    ]
    extraction_cold = runs[1]["extraction_s"]
    cache_hits = [r["extraction_s"] for r in runs[3::2]]
    verdict = "PASS" if ratio >= LIMIT else "FAIL"
    n_train = args.classes * args.train_per_class
    n_val = args.classes * args.val_per_class
    val_uncached = statistics.median(t for r in runs if not r["cached"] for t in r["validation_s"])
    val_cached = statistics.median(t for r in runs if r["cached"] for t in r["validation_s"])

    print(f"## Linear probe epoch time, cached vs uncached (vits16 random, full depth, 224 px, {n_train} train "
          f"images, batch {args.batch_size}, CPU, {torch.get_num_threads()} threads)\n")  # fmt: skip
    print(markdown_table(
        ["path", "train epoch s (median)", "img/s", "validation s", "one-off extraction s"],
        [
            ["uncached", sig(uncached_s), sig(n_train / uncached_s), sig(val_uncached), "-"],
            ["cached", sig(cached_s), sig(n_train / cached_s), sig(val_cached),
             f"{extraction_cold:.2f} cold ({n_train + n_val} images); cache hit {statistics.median(cache_hits) if cache_hits else float('nan'):.3f}"],
        ],
    ))  # fmt: skip
    print(f"\ncached epoch is {ratio:.0f}x faster (per-round ratios {', '.join(f'{r:.0f}x' for r in round_ratios)}); "
          f"limit {LIMIT:.0f}x -> {verdict}")  # fmt: skip
    path = write_result(args.name, {
        "settings": {**vars(args), "backbone": "vits16 random full depth", "image_size": 224,
                     "train_images": n_train, "val_images": n_val,
                     "epoch_timing": "on_train_epoch_start -> last on_train_batch_end; first epoch of each run excluded"},
        "uncached_epoch_s": uncached_s, "cached_epoch_s": cached_s, "ratio": ratio, "round_ratios": round_ratios,
        "limit": LIMIT, "verdict": verdict, "extraction_cold_s": extraction_cold, "cache_hit_load_s": cache_hits,
        "runs": runs,
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
