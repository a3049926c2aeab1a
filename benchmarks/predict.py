"""Folder prediction speed against the backbone alone: how much of `dinov3ds predict` is overhead.

A classification and a segmentation checkpoint (random-weight full ViT-S/16, heads trained one epoch on
generated images so the files are real checkpoints) predict a folder of JPEG photos through the same code
as `dinov3ds predict` (`classify_files` / `segment_files`: decoding in loader workers, batches of
`inference.batch_size`, same-size batching for segmentation). The yardstick is the model's forward alone on
the same images already decoded, resized and stacked, in the same batches: what a perfect pipeline could do.

    predict images/s / forward-only images/s  (target for classification at 224, batch 8: >= 0.80)

Segmentation is printed for information (its predict also resizes the probabilities back to each photo).
Run from the repository root: `python benchmarks/predict.py` (about 2 minutes on 2 cores); `--images`,
`--batch`, `--workers`, `--device`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

TARGET = 0.80


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """JPEGs of 500x375 (ImageNet's typical size) with smooth content, so decoding costs what a photo costs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    y, x = np.mgrid[0:375, 0:500] / 60.0
    for i in range(count):
        phase = rng.uniform(0, 6.3, 3)
        pixels = np.stack([127 + 120 * np.sin(x * (1 + c) + y + phase[c]) for c in range(3)], axis=-1)
        pixels += rng.normal(0, 12, pixels.shape)
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def train_checkpoint(work: Path, task: str) -> Path:
    """One epoch on a few generated images: a real checkpoint for a full-size random ViT-S/16."""
    from dinov3ds.cli import main
    from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder

    common = ["backbone.weights=random", "data.num_workers=0", "trainer.progress_bar=false", "trainer.max_epochs=1",
              f"output_dir={work / task}"]  # fmt: skip
    if task == "classification":
        root = make_classification_folder(work / "cls_data", num_classes=3, train_per_class=2, val_per_class=1, size=64)
        args = ["train", *common, f"data.root={root}", "data.image_size=224"]
    else:
        root = make_segmentation_folder(work / "seg_data", num_classes=3, train=4, val=2, size=(64, 64))
        args = ["train", *common, "task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
                "data.num_classes=3", "data.image_size=224", "head.name=linear", "data.batch_size=2"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0, f"training the {task} checkpoint failed"
    return work / task / "checkpoints" / "last.ckpt"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(task: str, checkpoint: Path, photos: list[Path], batch: int, workers: int, device: str) -> dict:
    from dinov3ds.commands.predict import classify_files, segment_files
    from dinov3ds.data.image_batches import ImageFiles
    from dinov3ds.data.transforms import SegmentationEvalTransform
    from dinov3ds.models.tasks import load_model

    overrides = [f"inference.batch_size={batch}", f"data.num_workers={workers}", "data.eval_size=224"]
    model = load_model(checkpoint, device=device, overrides=overrides)
    if task == "classification":
        transform = model.eval_transform()

        def predict() -> None:
            classify_files(model, photos, topk=5)

        forward = model
    else:
        transform = SegmentationEvalTransform(224, model.backbone.mean, model.backbone.std).image_only

        def predict() -> None:
            for _ in segment_files(model, photos):
                pass

        def forward(images: torch.Tensor) -> torch.Tensor:
            return model.predict_probabilities(images)

    decoded = ImageFiles(photos, transform)
    tensors = torch.stack([decoded[i][0] for i in range(len(photos))])  # all photos share one size here
    batches = [tensors[i : i + batch].to(model.device) for i in range(0, len(tensors), batch)]

    @torch.inference_mode()
    def forward_only() -> None:
        for images in batches:
            forward(images)
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    forward_only()  # warm-up (allocator, oneDNN primitives)
    predict()
    # Alternate the two measurements so drift of a shared machine hits both alike; best of 2 each.
    forward_s = min(timed(forward_only), timed(forward_only))
    predict_s = min(timed(predict), timed(predict))
    return {
        "task": task, "images": len(photos), "input": list(tensors.shape[-2:]), "batch": batch, "workers": workers,
        "forward_only_images_per_s": len(photos) / forward_s, "predict_images_per_s": len(photos) / predict_s,
        "ratio": forward_s / predict_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes for decoding")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="predict", help="results/<name>.json")
    args = parser.parse_args()

    import logging
    import warnings

    from dinov3ds.models.hardware import resolve_device

    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    device = str(resolve_device(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", args.images)
        for task in ("classification", "segmentation"):
            print(f"{task} ...", file=sys.stderr, flush=True)
            rows.append(measure(task, train_checkpoint(work, task), photos, args.batch, args.workers, device))
    print(f"## Folder predict vs forward only: {args.images} JPEG photos 500x375, vits16 (random, full depth), "
          f"batch {args.batch}, {args.workers} loader worker(s), {device}\n")  # fmt: skip
    print(markdown_table(
        ["task", "input", "forward only img/s", "predict img/s", "predict / forward", f"target {TARGET:.0%}"],
        [[r["task"], "x".join(map(str, r["input"])), round(r["forward_only_images_per_s"], 1),
          round(r["predict_images_per_s"], 1), round(r["ratio"], 3),
          ("met" if r["ratio"] >= TARGET else "MISSED") if r["task"] == "classification" else "(information)"]
         for r in rows],
    ))  # fmt: skip
    path = write_result(args.name, {"device": device, "target_ratio_classification": TARGET, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
