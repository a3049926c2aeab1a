"""Is the data loader the bottleneck? Images/s of the classification loader alone vs the model alone.

The loader is the training one (`data/build.py`): JPEG decode + RandomResizedCrop 224 + flip + normalise in
worker processes, at the config's default worker count. The model is a full-size random-weight `vits16`
forward (frozen, no_grad) on batches of the same size. Acceptance: loader >= 1.5x the model's images/s.

Run from the repository root: `python benchmarks/loader.py` (quick: 256 generated 320x240 JPEGs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import markdown_table, write_result  # noqa: E402
from PIL import Image  # noqa: E402

LIMIT = 1.5


def make_jpegs(root: Path, count: int, classes: int = 4) -> None:
    """Photo-sized noisy JPEGs, so decoding costs what a real image costs."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / "train" / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    for label in range(classes):  # a token val split: the dataset builder wants both
        (root / "val" / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((240, 320, 3), dtype=np.uint8)).save(root / "val" / f"class_{label}" / "a.jpg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="accepted for run_all; the default is already quick")
    args = parser.parse_args()

    from dinov3ds.config import load_config
    from dinov3ds.data.build import build_datasets
    from dinov3ds.models.backbones import load_backbone
    from dinov3ds.training.trainer import _loader

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        make_jpegs(root, args.images)
        config = load_config(None, [f"data.root={root}", "data.image_size=224", f"data.batch_size={args.batch_size}"])
        backbone = load_backbone("vits16", "random")
        splits = build_datasets(config, backbone.mean, backbone.std)
        loader = _loader(splits.train, config, batch_size=args.batch_size, train=True)

        iterator = iter(loader)
        next(iterator)  # workers started and warm
        start, seen = time.perf_counter(), 0
        for images, _ in iterator:
            seen += len(images)
        loader_rate = seen / (time.perf_counter() - start)

        batch = torch.randn(args.batch_size, 3, 224, 224)
        with torch.no_grad():
            backbone(batch)
            start = time.perf_counter()
            rounds = 3
            for _ in range(rounds):
                backbone(batch)
        model_rate = rounds * args.batch_size / (time.perf_counter() - start)

    ratio = loader_rate / model_rate
    verdict = "PASS" if ratio >= LIMIT else "FAIL"
    rows = [[config.data.num_workers, round(loader_rate, 1), round(model_rate, 1), round(ratio, 2), verdict]]
    print(markdown_table(["workers", "loader img/s", "vits16 model img/s", "loader/model", f">= {LIMIT}"], rows))
    path = write_result("loader", {"workers": config.data.num_workers, "batch_size": args.batch_size,
                                   "loader_images_per_s": loader_rate, "model_images_per_s": model_rate,
                                   "ratio": ratio, "verdict": verdict})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
