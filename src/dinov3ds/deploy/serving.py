"""An exported file behind the interface `predict` uses for a checkpoint, so both take one path: the same
transforms, batches, inference strategies (whole, slide, flip / scale TTA), label files and summaries, with
onnxruntime computing the logits. Everything comes from the file's metadata; the checkpoint models' own
methods (`top_labels`, `predict_probabilities`, ...) are reused, not copied, so the two cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3ds.config import Config, with_overrides
from dinov3ds.deploy.runtime import OnnxModel
from dinov3ds.errors import UserError
from dinov3ds.models.depth import DepthEstimator
from dinov3ds.models.tasks import Classifier, Segmenter

# Overrides that still mean something for a finished graph (how to run it, how --labels are read and scored);
# the rest is fixed in the file.
RUN_SETTINGS = ("inference.", "data.eval_size", "data.num_workers", "depth.eigen_crop", "depth.depth_scale")
IGNORED = ("backbone.dtype",)  # --float32: the graph's precision is its own


class Normalisation(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


class _OnnxTask:
    """What both tasks share: the session, a config rebuilt from the metadata, the CPU as torch's device."""

    def __init__(self, runner: OnnxModel, config: Config) -> None:
        facts = runner.facts
        self.runner, self.config = runner, config
        self.class_names = list(facts.class_names)
        self.num_classes = len(facts.class_names)
        self.input_multiple = facts.input_multiple
        self.backbone = Normalisation(tuple(facts.mean), tuple(facts.std))
        self.device = torch.device("cpu")  # where torch holds the batches; onnxruntime copies to its providers

    def __call__(self, images: Tensor) -> Tensor:
        """Logits for a normalised batch; a fixed-size file gets it resized to its size (logits resized back)."""
        fixed = self.runner.facts.input_size
        size = tuple(images.shape[-2:])
        if fixed is not None and list(size) != list(fixed):
            images = F.interpolate(images.float(), size=tuple(fixed), mode="bilinear", align_corners=False)
        logits = torch.from_numpy(self.runner.logits(images.float().cpu().numpy()))
        if logits.ndim == 4 and tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class OnnxClassifier(_OnnxTask):
    eval_transform = Classifier.eval_transform
    top_labels = Classifier.top_labels


class OnnxSegmenter(_OnnxTask):
    inference_options = Segmenter.inference_options
    predict_probabilities = Segmenter.predict_probabilities


class OnnxDepthEstimator(_OnnxTask):
    """The graph's output is already metres: the checkpoint model's resizing, flip averaging and transform."""

    eval_transform = DepthEstimator.eval_transform
    predict_depth = DepthEstimator.predict_depth
    predict = DepthEstimator.predict


TASK_CLASSES = {"classification": OnnxClassifier, "segmentation": OnnxSegmenter, "depth": OnnxDepthEstimator}


def _config(runner: OnnxModel, overrides: list[str]) -> Config:
    """The settings `predict` reads, from the metadata, with the run-time overrides on top."""
    facts = runner.facts
    inference, depth = dict(facts.inference), {}
    if facts.task == "classification":
        data = {"image_size": facts.preprocess["center_crop"]}
    elif facts.task == "depth":
        data = {"eval_size": facts.preprocess["resize_shorter"]}
        depth = {key: facts.depth[key] for key in ("min_depth", "max_depth", "eigen_crop", "depth_scale")}
    else:
        data = {"image_size": inference["crop"], "eval_size": facts.preprocess["resize_shorter"],
                "reduce_zero_label": facts.label_offset == 1}  # fmt: skip
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(RUN_SETTINGS + IGNORED):
            raise UserError(f"{runner.path}: '{key}' is fixed in the exported file; only inference.*, data.eval_size, "
                            "data.num_workers and depth.eigen_crop / depth_scale apply to it (or predict with the .ckpt)")  # fmt: skip
        kept += [] if key.startswith(IGNORED) else [item]
    tree = {"task": facts.task, "data": data, "inference": inference, **({"depth": depth} if depth else {})}
    return with_overrides(tree, kept, str(runner.path))


def load_onnx(path: str | Path, device: str = "auto", overrides: list[str] | None = None) -> _OnnxTask:
    """The file at `path` ready for `predict`: classification, segmentation or depth, whichever it was exported as."""
    runner = OnnxModel(path, device)
    config = _config(runner, list(overrides or []))
    return TASK_CLASSES[runner.facts.task](runner, config)
