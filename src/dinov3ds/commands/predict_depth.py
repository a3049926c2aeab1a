"""`dinov3ds predict` with a depth checkpoint: per image a 16-bit depth PNG (millimetres, 0 = nothing) and a
coloured picture with its colour bar in metres; with `--labels DEPTH_FOLDER`, the eight depth metrics against
the depth files there (`<stem>.png` millimetres or `<stem>.npy` metres), per image and over the set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from dinov3ds.commands.output_files import OutputFolder, input_root, mirrored, staged
from dinov3ds.data.depth import DEPTH_SUFFIXES, load_depth
from dinov3ds.data.image_batches import image_batches
from dinov3ds.data.io import decode_image
from dinov3ds.errors import UserError
from dinov3ds.metrics.depth import DepthMetric, format_summary, write_per_image_csv
from dinov3ds.models.inference import budget_slices


def save_depth_png(depth: np.ndarray, path: Path) -> None:
    """Metres → uint16 millimetres (clipped to 65.535 m), the format depth folders are read in."""
    from PIL import Image

    Image.fromarray(np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)).save(path, format="PNG")


def save_depth_picture(depth: np.ndarray, path: Path, max_depth: float) -> None:
    """The depth map in a perceptual colour map, near dark, with a colour bar in metres."""
    height, width = depth.shape
    figure = Figure(figsize=(max(3.0, 4 * width / max(height, width)) + 1.0, 4 * height / max(height, width)), dpi=100)
    axes = figure.add_subplot()
    shown = axes.imshow(depth, cmap="magma_r", vmin=0.0, vmax=max_depth)
    axes.set_axis_off()
    figure.colorbar(shown, ax=axes, label="depth (m)")
    figure.savefig(path, format="png", bbox_inches="tight")


def _truth(image: Path, labels: Path, root: Path) -> Path:
    stem = image.resolve().relative_to(root).with_suffix("")
    for suffix in DEPTH_SUFFIXES:
        if (labels / f"{stem}{suffix}").is_file():
            return labels / f"{stem}{suffix}"
    raise UserError(f"--labels {labels}: no depth file {labels / stem}.png (or .npy) for image {image}; "
                    "give the folder holding one per image")  # fmt: skip


def _checked_truths(images: list[Path], labels: Path, root: Path, scale: float | None) -> list[Path]:
    """Each image's depth file, read and held against its image's size before any prediction is written."""
    truths = [_truth(image, labels, root) for image in images]
    for image, truth in zip(images, truths):
        height, width = decode_image(image, target=lambda *_: (1, 1))[1]  # JPEGs decoded at 1/8 scale: size only
        depth = load_depth(truth, scale)
        if depth.shape != (height, width):
            raise UserError(f"--labels: depth file {truth} is {depth.shape[1]}x{depth.shape[0]} but image {image} is "
                            f"{width}x{height}; depth maps must match their image")  # fmt: skip
    return truths


@torch.inference_mode()
def predict_depth_images(model, images: list[Path], out: OutputFolder, labels: str | None,
                         workers: int = 0) -> dict | None:  # fmt: skip
    """Depth PNG + picture per image, mirrored under `out`; the metrics when `labels` names the true depths.
    Images are decoded in `workers` processes (JPEGs at reduced scale when the model's input is at least 2x
    smaller) and predicted `inference.batch_size` at a time, each batch of one transformed size, split where its
    bins' scores would pass PROBABILITY_BUDGET (256 bins of a 480x640 image are 315 MB)."""
    root = input_root(images)
    depth_section = model.config.depth
    truths = _checked_truths(images, Path(labels), root, depth_section.depth_scale) if labels else None
    targets = [(out.claim(mirrored(p, root, ".depth.png")), out.claim(mirrored(p, root, ".depth_color.png"))) for p in images]
    if truths is not None:
        scored = [out.claim(name) for name in ("depth_metrics.json", "depth_per_image.csv")]
    eigen = bool(depth_section.eigen_crop) if depth_section.eigen_crop is not None else model.config.data.dataset == "nyu"
    metric = DepthMetric(depth_section.min_depth, depth_section.max_depth, eigen)
    loader = image_batches(images, model.eval_transform(), model.config.inference.batch_size, by_size=True,
                           workers=workers, pin_memory=model.device.type == "cuda")  # fmt: skip
    scored_order: list[int] = []  # the metric's rows follow the batches (grouped by size), put back in input order
    for batch, sizes, indices in loader:
        depths = torch.cat([model.predict_depth(batch[part]) for part in budget_slices(batch, depth_section.bins)])
        for depth_map, size, index in zip(depths, sizes.tolist(), indices.tolist()):
            resized = F.interpolate(depth_map[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
            depth = resized[0, 0].cpu().numpy()
            depth_path, picture_path = targets[index]
            with staged(depth_path) as temporary:
                save_depth_png(depth, temporary)
            with staged(picture_path) as temporary:
                save_depth_picture(depth, temporary, depth_section.max_depth)
            if truths is not None:
                truth = load_depth(truths[index], depth_section.depth_scale)  # its size checked up front
                metric.update(torch.from_numpy(depth)[None], torch.from_numpy(truth)[None])
                scored_order.append(index)
    print(f"wrote depth PNGs (millimetres, 16-bit) and coloured pictures for {len(images)} images to {out.root}")
    if truths is None:
        return None
    result = metric.compute()
    result["per_image"] = result["per_image"][torch.tensor(scored_order).argsort()]
    json_path, csv_path = scored
    scalars = {k: v for k, v in result.items() if isinstance(v, float)}
    with staged(json_path) as temporary:
        temporary.write_text(json.dumps({**scalars, "images": result["images"]}, indent=2))
    with staged(csv_path) as temporary:
        write_per_image_csv(result, temporary, [str(p) for p in images])
    print(f"depth ({result['images']} images): {format_summary(result)}")
    return result
