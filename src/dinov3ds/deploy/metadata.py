"""What a serving stack needs to know about an exported graph, kept in the file itself: ONNX `metadata_props`
under keys prefixed `dinov3ds.`, written at export and read back from any file without PyTorch.

Text facts are stored as they are (`dinov3ds.task` = `segmentation`); numbers, lists and tables as JSON
(`dinov3ds.class_names` = `["road", "car"]`, `dinov3ds.mean` = `[0.485, 0.456, 0.406]`). The input is
float32 NCHW: RGB pixels divided by 255 (`value_range` [0, 1]), minus `mean`, divided by `std`. The output is
logits (`logits`), or for `dinov3ds.task` = `depth` depth in metres [B,1,H,W] (`depth`, with `dinov3ds.depth`
= `{"unit": "m", "min_depth": 0.001, "max_depth": 10.0, ...}`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dinov3ds import __version__
from dinov3ds.errors import UserError

if TYPE_CHECKING:
    from dinov3ds.config import Config
    from dinov3ds.models.depth import DepthEstimator
    from dinov3ds.models.tasks import Classifier, Segmenter

PREFIX = "dinov3ds."
CROP_RATIO = 224 / 256  # classification: the shorter side is resized to crop / CROP_RATIO, then centre-cropped
INFERENCE_KEYS = ("mode", "crop", "stride", "window_batch", "flip", "scales", "batch_size")
TASKS = ("classification", "segmentation", "depth")
OPTIONAL = ("depth",)  # keys only some tasks write (files of other tasks, and older files, lack them)


@dataclass(frozen=True)
class ServingFacts:
    """The metadata of one exported file (one attribute per `dinov3ds.` key)."""

    task: str  # classification | segmentation | depth
    class_names: list[str]  # output channel k is class_names[k] (depth: ["depth"], its one channel)
    mean: list[float]  # per RGB channel, on the 0-1 scale
    std: list[float]
    input_multiple: int  # height and width must be multiples of this
    input_size: list[int] | None  # [height, width] of a fixed-size export; None: any multiple
    label_offset: int  # segmentation label PNGs hold class id + this (1: ADE20K's 0 = "other")
    backbone: str
    weights_sha256: str  # the pretrained backbone file's SHA-256 ("" for random test weights)
    head: str
    version: str  # dinov3ds version that wrote the file
    precision: str  # float32 | float16 (inside the graph; its input and output are float32)
    preprocess: dict  # classification: resize_shorter, center_crop; segmentation: resize_shorter (None: as is)
    inference: dict  # segmentation strategy as trained: mode, crop, stride, window_batch, flip, scales, batch_size
    color_order: str = "RGB"
    value_range: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])
    # depth: unit ("m"), min_depth / max_depth (the head's range), eigen_crop, depth_scale (how --labels are scored)
    depth: dict = dataclasses.field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """The `metadata_props` entries: key → text (an optional key left out when empty)."""
        return {PREFIX + name: value if isinstance(value, str) else json.dumps(value)
                for name, value in dataclasses.asdict(self).items() if value or name not in OPTIONAL}  # fmt: skip

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> ServingFacts:
        """The facts of a file's metadata; a file dinov3ds did not write (or one edited badly) is refused."""
        if PREFIX + "task" not in props:
            raise UserError(f"{source} has no dinov3ds metadata (dinov3ds.task, dinov3ds.class_names, ...); "
                            "export it with `dinov3ds export`, or run it with onnxruntime directly")  # fmt: skip
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            text = props.get(PREFIX + field.name)
            if text is None and field.name in OPTIONAL:
                continue
            if text is None:
                raise UserError(f"{source}: metadata key {PREFIX}{field.name} is missing; export the file again")
            try:
                values[field.name] = text if field.type == "str" else json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"{source}: metadata key {PREFIX}{field.name} is not JSON ({text[:60]!r}); "
                                "export the file again") from None  # fmt: skip
        facts = cls(**values)
        if facts.task not in TASKS or not facts.class_names or (facts.task == "depth") != bool(facts.depth):
            raise UserError(f"{source}: metadata task {facts.task!r} with {len(facts.class_names)} classes is not "
                            "a dinov3ds model; export the file again")  # fmt: skip
        return facts


def label_offset(config: Config) -> int:
    """Label PNGs in the dataset's own convention: ADE20K-style data (`reduce_zero_label`: 0 = "other",
    classes from 1) gets class id + 1, so a prediction compares directly with an annotation; else the id."""
    data = config.data
    return 1 if config.task == "segmentation" and (data.reduce_zero_label or data.dataset == "ade20k") else 0


def depth_facts(config: Config) -> dict:
    """A depth model's output range and how its predictions are scored (`--labels`), as `predict` reads them."""
    depth = config.depth
    eigen = depth.eigen_crop if depth.eigen_crop is not None else config.data.dataset == "nyu"
    return {"unit": "m", "min_depth": depth.min_depth, "max_depth": depth.max_depth, "eigen_crop": bool(eigen),
            "depth_scale": depth.depth_scale}  # fmt: skip


def facts_of(model: Classifier | Segmenter | DepthEstimator, input_size: tuple[int, int] | None,
             precision: str) -> ServingFacts:  # fmt: skip
    """The facts of `model` exported for `input_size` (None: any size) in `precision`."""
    config, backbone = model.config, model.backbone
    if config.task == "classification":
        size = config.data.image_size
        preprocess = {"resize_shorter": round(size / CROP_RATIO), "center_crop": size}
        inference = {"batch_size": config.inference.batch_size}
    elif config.task == "depth":  # whole image only (DepthEstimator.predict_depth); flip averages the mirror
        preprocess = {"resize_shorter": config.data.eval_size}
        inference = {"flip": config.inference.flip, "batch_size": config.inference.batch_size}
    else:
        preprocess = {"resize_shorter": config.data.eval_size}
        inference = {key: getattr(config.inference, key) for key in INFERENCE_KEYS}
        inference["crop"] = inference["crop"] or config.data.image_size
    depth = config.task == "depth"
    return ServingFacts(
        task=config.task, class_names=["depth"] if depth else list(model.class_names), mean=list(backbone.mean),
        std=list(backbone.std), input_multiple=model.input_multiple, input_size=list(input_size) if input_size else None,
        label_offset=label_offset(config), backbone=backbone.identity["name"],
        weights_sha256=backbone.identity.get("sha256", ""), head=config.head.name, version=__version__,
        precision=precision, preprocess=preprocess, inference=inference,
        depth=depth_facts(config) if depth else {},
    )  # fmt: skip
