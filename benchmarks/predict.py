"""Folder prediction speed against the model alone: how much of `dinov3ds predict` the decoding pipeline costs.

A classification and a segmentation checkpoint (random-weight full ViT-S/16, heads trained one epoch on
generated images so the files are real checkpoints) predict a folder of JPEG photos through the command's own
functions (`predict_classification` / `predict_segmentation`: loader workers as the command chooses them,
batches of `inference.batch_size`, outputs written: the CSV/JSONL rows, label PNGs and overlays). The
yardstick is the model's forward alone on the same images already decoded, resized and stacked, in the same
batches: what a perfect pipeline could do. Each row names the backbone's dtype (`backbone.dtype` float32 or
bfloat16, whatever `auto` would pick) and the CPU (model, and whether it lists avx512_bf16 / amx_bf16).

    predict images/s / forward-only images/s   targets: >= 0.90 in float32, >= 0.80 in bfloat16 (224, batch 8)

(images/s from the median round; the ratio is the median of the rounds' ratios).

Below the table, one batch taken apart in this process (decode, resize to the model's input, collate,
forward, outputs): where a missed target's time goes. Run from the repository root: `python
benchmarks/predict.py` (about 6 minutes on 2 cores); `--images`, `--batch`, `--photo WxH`, `--device`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import cpu_model, markdown_table, write_result  # noqa: E402
from PIL import Image  # noqa: E402

TARGETS = {"float32": 0.90, "bfloat16": 0.80}
TASKS = ("classification", "segmentation")


def make_photos(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """JPEGs of `size` (width, height; 500x375 is ImageNet's typical photo) with smooth content and noise, so
    decoding costs what a photo costs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    width, height = size
    y, x = np.mgrid[0:height, 0:width] * (500 / width) / 60.0
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


def cpu_line() -> str:
    """The CPU model and its bf16 flags, as /proc/cpuinfo lists them."""
    from dinov3ds.models.hardware import cpu_flags

    flags = cpu_flags() or frozenset()
    listed = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{cpu_model()} ({', '.join(listed) + ' listed' if listed else 'no avx512_bf16 / amx_bf16'})"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def load(checkpoint: Path, dtype: str, batch: int, device: str, workers: int):
    from dinov3ds.models.tasks import load_model

    overrides = [f"inference.batch_size={batch}", "data.eval_size=224", f"backbone.dtype={dtype}", f"data.num_workers={workers}"]
    return load_model(checkpoint, device=device, overrides=overrides)


def transform_of(model, task: str):
    from dinov3ds.data.transforms import SegmentationEvalTransform

    if task == "classification":
        return model.eval_transform()
    return SegmentationEvalTransform(224, model.backbone.mean, model.backbone.std, multiple_of=model.input_multiple)


def forward_of(model, task: str):
    return model if task == "classification" else model.predict_probabilities


def measure(model, task: str, photos: list[Path], out: Path, repeats: int = 5, files: bool = True) -> dict:
    """Images/s of one loaded model three ways, in rounds of one each back to back, so that drift of a shared
    machine hits a round's measurements alike; ratios are the median over rounds of each round's ratio. The
    three: the forward alone on ready batches; the command's pipeline (`classify_files` / `segment_files`:
    files to class scores); with `files` the whole command's work with its files written."""
    from dinov3ds.commands import predict as command
    from dinov3ds.commands.output_files import OutputFolder
    from dinov3ds.data.image_batches import ImageFiles

    batch = model.config.inference.batch_size
    decoded = ImageFiles(photos, transform_of(model, task))
    tensors = torch.stack([decoded[i][0] for i in range(len(photos))])  # all photos share one size here
    batches = [tensors[i : i + batch].to(model.device) for i in range(0, len(tensors), batch)]
    forward = forward_of(model, task)

    def synchronize() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def forward_only() -> None:
        for images in batches:
            forward(images)
        synchronize()

    def pipeline() -> None:
        if task == "classification":
            command.classify_files(model, photos, topk=5)
        else:
            for _ in command.segment_files(model, photos):
                pass
        synchronize()

    def with_files() -> None:
        folder = OutputFolder(out, inputs=photos, overwrite=True)
        with contextlib.redirect_stdout(io.StringIO()), folder.held("--out"):
            if task == "classification":
                command.predict_classification(model, photos, folder, topk=5)
            else:
                command.predict_segmentation(model, photos, folder, mode=None)
        synchronize()

    forward_only()  # warm-up (allocator, oneDNN primitives, first worker start)
    pipeline()
    seconds: dict[str, list[float]] = {"forward": [], "pipeline": [], **({"files": []} if files else {})}
    functions = {"forward": forward_only, "pipeline": pipeline, "files": with_files}
    for round_ in range(repeats):
        for name in list(seconds)[:: 1 if round_ % 2 == 0 else -1]:  # order flipped each round: a trend cancels
            seconds[name].append(timed(functions[name]))
    middle = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = {name: statistics.median(f / t for f, t in zip(seconds["forward"], values)) for name, values in seconds.items()}
    row = {
        "task": task, "dtype": str(next(model.backbone.parameters()).dtype).removeprefix("torch."),
        "images": len(photos), "input": list(tensors.shape[-2:]), "batch": batch, "workers": command._workers(model),
        "forward_only_images_per_s": len(photos) / middle["forward"], "predict_images_per_s": len(photos) / middle["pipeline"],
        "ratio": ratio["pipeline"], "seconds": seconds,
    }  # fmt: skip
    if files:
        row |= {"with_files_images_per_s": len(photos) / middle["files"], "with_files_ratio": ratio["files"]}
    return row


@torch.inference_mode()
def profile_batch(model, task: str, photos: list[Path], out: Path) -> dict:
    """Seconds per stage for one batch in this process, one stage after another: where a batch's time goes.
    Decoding, resizing and collating run on one thread, as in a loader worker."""
    from dinov3ds.data.io import decode_image
    from dinov3ds.data.transforms import image_tensor
    from dinov3ds.models.inference import labels_at_size
    from dinov3ds.viz import default_palette, save_color_png, save_label_png

    transform, stages, threads = transform_of(model, task), {}, torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    decoded = [decode_image(path, None if task == "segmentation" else transform.resize_size) for path in photos]
    pixels = [np.asarray(image) for image, _ in decoded]
    stages["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    inputs = [transform.prepare(image_tensor(p), transform.resize_size(*size)) for p, (_, size) in zip(pixels, decoded)]
    stages["resize + normalise"] = time.perf_counter() - start
    start = time.perf_counter()
    batch = torch.stack(inputs)
    stages["collate"] = time.perf_counter() - start
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if task == "classification":
        rows = model.top_labels(batch, 5)
        stages["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        (out / "rows.jsonl").write_text("".join(f"{row}\n" for row in rows))
    else:
        probabilities = model.predict_probabilities(batch.to(model.device))
        stages["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        for i, (picture, (_, size)) in enumerate(zip(pixels, decoded)):
            labels = labels_at_size(probabilities[i : i + 1], size)[0].cpu().numpy()
            save_label_png(labels, out / f"{i}.labels.png", num_classes=model.num_classes)
            save_color_png(labels, out / f"{i}.overlay.png", default_palette(model.num_classes), image=picture,
                           class_names=model.class_names)  # fmt: skip
    stages["outputs"] = time.perf_counter() - start
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--photo", default="500x375", help="photo width x height")
    parser.add_argument("--workers", type=int, default=4,
                        help="data.num_workers, the cap on the loader workers predict chooses (4: the default)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (medians are reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="predict", help="results/<name>.json")
    args = parser.parse_args()

    import logging
    import warnings

    from dinov3ds.models.hardware import resolve_device

    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    device = str(resolve_device(args.device))
    size = tuple(int(v) for v in args.photo.split("x"))
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = make_photos(work / "photos", args.images, size=size)
        for task in TASKS:
            checkpoint = train_checkpoint(work, task)
            for dtype in args.dtypes.split(","):
                print(f"{task} {dtype} ...", file=sys.stderr, flush=True)
                model = load(checkpoint, dtype, args.batch, device, args.workers)
                rows.append(measure(model, task, photos, work / f"out_{task}_{dtype}", args.repeats))
                (work / f"profile_{task}_{dtype}").mkdir()
                stages = profile_batch(model, task, photos[: args.batch], work / f"profile_{task}_{dtype}")
                profiles.append({"task": task, "dtype": dtype, "seconds": stages})
    cpu = cpu_line()
    print(f"## Folder predict vs forward only: {args.images} JPEG photos {args.photo}, vits16 (random, full depth), "
          f"batch {args.batch}, {device}; CPU: {cpu}\n")  # fmt: skip
    print(markdown_table(
        ["task", "backbone dtype", "input", "workers", "forward only img/s", "predict img/s", "predict / forward",
         "target", "with files written img/s", "with files / forward"],
        [[r["task"], r["dtype"], "x".join(map(str, r["input"])), r["workers"], round(r["forward_only_images_per_s"], 1),
          round(r["predict_images_per_s"], 1), round(r["ratio"], 3),
          f"{TARGETS[r['dtype']]:.2f} {'met' if r['ratio'] >= TARGETS[r['dtype']] else 'MISSED'}",
          round(r["with_files_images_per_s"], 1), round(r["with_files_ratio"], 3)] for r in rows],
    ))  # fmt: skip
    stage_names = list(profiles[0]["seconds"])
    print(f"\n## One batch of {args.batch} in one process, stage by stage (ms)\n")
    print(markdown_table(["task", "backbone dtype", *stage_names, "pipeline share"],
                         [[p["task"], p["dtype"], *(round(1000 * p["seconds"][s], 1) for s in stage_names),
                           f"{1 - p['seconds']['forward'] / sum(p['seconds'].values()):.1%}"] for p in profiles]))  # fmt: skip
    path = write_result(args.name, {"device": device, "cpu_line": cpu, "photo": args.photo, "targets": TARGETS,
                                    "rows": rows, "profiles": profiles})  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
