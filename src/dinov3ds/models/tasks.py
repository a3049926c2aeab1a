"""Classifier and Segmenter: a frozen DINOv3 backbone plus a small trained head.

Both can be rebuilt from a head-only checkpoint (`from_checkpoint`) and used from Python:

    clf = Classifier.from_checkpoint("output/cls/checkpoints/best.ckpt")
    clf.predict(["cat.jpg"], topk=5)
    seg = Segmenter.from_checkpoint("output/seg/checkpoints/best.ckpt")
    labels = seg.predict("street.jpg", mode="slide")
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dinov3ds.config import Config, with_overrides
from dinov3ds.data.io import load_image
from dinov3ds.data.transforms import SegmentationEvalTransform, classification_eval_transform
from dinov3ds.errors import UserError
from dinov3ds.heads import build_head, head_class
from dinov3ds.models import eomt_transformers
from dinov3ds.models.backbones import Backbone, load_backbone
from dinov3ds.models.checkpoints import HeadCheckpoint, read_checkpoint, resolve_backbone_weights
from dinov3ds.models.finetune import add_adapters, load_trained_weights
from dinov3ds.models.hardware import auto_inference_dtype, native_support, resolve_device
from dinov3ds.models.inference import InferenceOptions, labels_at_size, run_inference

ImageInput = str | Path | Image.Image | np.ndarray

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Settings the trained head's weights depend on: a checkpoint's config cannot override them.
TRAINED_SETTINGS = ("task", "backbone.name", "backbone.layers", "backbone.overrides", "backbone.unfreeze_last_blocks",
                    "backbone.finetune", "backbone.lora",
                    "head", "data.num_classes", "data.class_names", "depth.min_depth", "depth.max_depth", "depth.bins",
                    "depth.bins_norm")  # fmt: skip


def backbone_dtype(config: Config, device: str | torch.device, *, inference: bool = False) -> torch.dtype:
    """The backbone's dtype: as configured, or for `auto` bfloat16 where the device computes it natively (see
    config): at inference on any such GPU or CPU, and in training for a frozen backbone in bf16 precision."""
    name = config.backbone.dtype
    if name == "auto" and inference:
        return auto_inference_dtype(device)
    if name == "auto":
        wanted = config.trainer.precision in ("bf16-mixed", "bf16-true") and config.backbone.finetune == "frozen"
        name = "bfloat16" if wanted and native_support(torch.bfloat16, device) else "float32"
    return TORCH_DTYPES[name]


def backbone_from_config(config: Config, device: str | torch.device = "cpu", *, inference: bool = False) -> Backbone:
    """The configured backbone; a transformers EoMT folder's own (`head.weights` starts from one: see its module)."""
    section, dtype = config.backbone, backbone_dtype(config, device, inference=inference)
    if config.head.weights:
        eomt_transformers.start_from_folder(config)
    if eomt_transformers.folder_of(section.weights) is not None:
        return eomt_transformers.folder_backbone(section.name, section.weights, section.overrides, dtype, device)
    return load_backbone(section.name, section.weights, dtype=dtype, device=device, **section.overrides)


def input_multiple(config: Config, backbone: Backbone) -> int:
    """The side length every input must be a multiple of: the backbone's patch size, and the head's own."""
    if config.task != "classification":
        return math.lcm(backbone.input_multiple, head_class(config.head.name).input_multiple)
    return backbone.input_multiple


def _frozen_context(backbone: Backbone) -> contextlib.AbstractContextManager:
    """No autograd graph through a frozen backbone: it keeps no activations for backward."""
    trainable = any(p.requires_grad for p in backbone.parameters())
    return contextlib.nullcontext() if trainable else torch.no_grad()


def _as_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8, copy=False)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() copies even when nothing changes


class LinearClassificationHead(nn.Module):
    """One linear layer, initialised as in DINOv3's linear evaluation (weights N(0, 0.01), bias 0).

    `batchnorm` adds a BatchNorm without affine in front: an option of ours (Meta's evaluation has none) that
    helps a single learning rate cope with features of very different scales.
    """

    def __init__(self, in_features: int, num_classes: int, batchnorm: bool = False, seed: int | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        self.linear = nn.utils.skip_init(nn.Linear, in_features, num_classes)  # draws nothing from the global RNG
        # A seed of its own: the start depends on the seed and the size only, not on what drew random numbers
        # before, so a head in a probe grid starts where the same head trained alone starts.
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        nn.init.normal_(self.linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features))


class _TaskModel(nn.Module):
    """What both models share: a backbone, the config they were built from, class names, the head's device."""

    head: nn.Module

    def __init__(self, backbone: Backbone, config: Config, class_names: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.class_names = list(class_names)

    @property
    def device(self) -> torch.device:
        """The head's device (the backbone is on the same one); inputs go there."""
        return next(self.head.parameters()).device

    @property
    def input_multiple(self) -> int:
        return input_multiple(self.config, self.backbone)


class Classifier(_TaskModel):
    """Frozen backbone → pooled tokens (cls, patch average, or both; last N blocks) → linear head."""

    def __init__(self, backbone: Backbone, num_classes: int, config: Config, class_names: list[str]):
        super().__init__(backbone, config, class_names)
        head = config.head
        self.pooling = head.pooling
        if head.pooling == "avg" and head.last_blocks > 1:
            raise UserError("head.last_blocks counts CLS tokens; with head.pooling: avg (patch mean of the last "
                            "block) set last_blocks: 1, or use pooling cls+avg")  # fmt: skip
        if head.last_blocks > backbone.depth:
            raise UserError(f"head.last_blocks={head.last_blocks} but {backbone.spec.name} has {backbone.depth} blocks")
        self.layers = list(range(backbone.depth - head.last_blocks, backbone.depth))
        width = backbone.feature_channels(self.layers)[-1]
        cls_parts = head.last_blocks if head.pooling in ("cls", "cls+avg") else 0
        self.feature_dim = width * (cls_parts + (1 if head.pooling in ("avg", "cls+avg") else 0))
        self.head = LinearClassificationHead(self.feature_dim, num_classes, head.batchnorm, config.seed)

    def features(self, images: Tensor) -> Tensor:
        """The vector the linear head sees (also what the feature cache stores): as DINOv3's linear evaluation
        builds it, the CLS tokens of the last `last_blocks` blocks, then the patch mean of the last block only
        (registers excluded); cls+avg over the last 4 blocks is 5 x the width."""
        with _frozen_context(self.backbone):
            taps = self.backbone.get_intermediate_layers(images, self.layers, norm=True)
            parts = [cls for _, cls in taps] if self.pooling in ("cls", "cls+avg") else []
            if self.pooling in ("avg", "cls+avg"):
                parts.append(taps[-1][0].mean(dim=(-2, -1)))
            return torch.cat(parts, dim=1).float()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", overrides: list[str] | None = None
    ) -> Classifier:
        """Head from `path` on its verified backbone; `overrides` e.g. ["backbone.dtype=bfloat16"]."""
        return _restore(cls, path, device, "classification", overrides)

    @torch.inference_mode()
    def predict(self, images: Sequence[ImageInput] | ImageInput, topk: int = 5, batch_size: int = 32) -> list[dict]:
        """Top-k labels and probabilities per image (paths, PIL images or HxWx3 uint8 arrays)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        transform = self.eval_transform()
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([transform(_as_pil(image)) for image in chunk]).to(self.device)
            for image, row in zip(chunk, self.top_labels(batch, topk)):
                results.append({"image": str(image) if isinstance(image, (str, Path)) else None, **row})
        return results

    def eval_transform(self):
        """Resize and centre crop as validation did: what every prediction input goes through."""
        return classification_eval_transform(self.config.data.image_size, self.backbone.mean, self.backbone.std)

    @torch.inference_mode()
    def top_labels(self, batch: Tensor, topk: int = 5) -> list[dict]:
        """Per image of a normalised batch: the top-k labels, their indices and probabilities."""
        probabilities = self(batch.to(self.device, non_blocking=True)).softmax(dim=1)
        values, indices = probabilities.topk(min(topk, len(self.class_names)), dim=1)
        return [{"labels": [self.class_names[i] for i in row_indices], "indices": row_indices,
                 "probabilities": row_values} for row_values, row_indices in zip(values.tolist(), indices.tolist())]  # fmt: skip


class Segmenter(_TaskModel):
    """Frozen backbone → multi-layer feature maps → segmentation head → logits at the input size."""

    def __init__(self, backbone: Backbone, num_classes: int, config: Config, class_names: list[str]):
        super().__init__(backbone, config, class_names)
        self.num_classes = num_classes
        self.layers = backbone.resolve_layers(config.backbone.layers)
        self.head = build_head(config.head.name, backbone.feature_channels(self.layers), backbone.feature_strides(self.layers),
                               num_classes, backbone.token_source(), **config.head.options)  # fmt: skip
        if config.head.weights:  # a transformers EoMT folder's queries and heads to start from
            eomt_transformers.start_head(self.head, config.head.weights)

    def features(self, images: Tensor) -> list[Tensor]:
        """One map [B, C, h, w] per tap, or for heads that read tokens one sequence [B, prefix + h*w, C]; a head
        that runs the backbone's last blocks itself (eomt) gets the un-normed sequence entering the first one."""
        with _frozen_context(self.backbone):
            if not self.head.reads_tokens:
                taps = self.backbone.get_intermediate_layers(images, self.layers, norm=True)
                return [patches.float() for patches, _ in taps]
            runs = self.head.backbone_blocks
            layers = [self.backbone.depth - runs - 1] if runs else self.layers
            taps = self.backbone.get_intermediate_layers(images, layers, norm=not runs, return_registers=True)
            return [torch.cat([cls[:, None], registers, patches.flatten(2).transpose(1, 2)], dim=1).float()
                    for patches, cls, registers in taps]  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images), images)

    def inference_options(self, **overrides) -> InferenceOptions:
        section = self.config.inference
        crop = section.crop or self.config.data.image_size
        values = {"mode": section.mode, "crop": crop, "stride": section.stride or max(crop * 2 // 3, 1),
                  "window_batch": section.window_batch, "flip": section.flip, "scales": tuple(section.scales)}  # fmt: skip
        values.update({k: v for k, v in overrides.items() if v is not None})
        return InferenceOptions(**values)

    @torch.inference_mode()
    def predict_probabilities(self, images: Tensor, **overrides) -> Tensor:
        """Class probabilities [B,K,H,W] at the batch's own size, by the configured strategy (whole/slide, TTA)."""
        options = self.inference_options(**overrides)
        return run_inference(self, images, options, self.num_classes)

    @torch.inference_mode()
    def predict_labels(self, images: Tensor, size: tuple[int, int], **overrides) -> Tensor:
        """Label maps [B,H,W] at `size` (the masks' or the original images' size) for a normalised batch."""
        return labels_at_size(self.predict_probabilities(images.to(self.device), **overrides), size)

    @torch.inference_mode()
    def predict(
        self, image: ImageInput, mode: str | None = None, return_probabilities: bool = False, **overrides
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Label map [H, W] at the image's own resolution (and class probabilities [K, H, W] on request)."""
        pil = _as_pil(image)
        transform = SegmentationEvalTransform(
            self.config.data.eval_size, self.backbone.mean, self.backbone.std, multiple_of=self.input_multiple
        )
        tensor, _ = transform(pil)  # no dummy mask: it would hold 8 bytes per pixel for nothing
        output = self.predict_probabilities(tensor[None].to(self.device), mode=mode, **overrides)
        size = (pil.height, pil.width)
        labels = labels_at_size(output, size)[0].cpu().numpy().astype(np.int64, copy=False)
        if return_probabilities:
            same = tuple(output.shape[-2:]) == size  # no full-size copy of a huge image's output
            probabilities = output if same else nn.functional.interpolate(output.float(), size=size, mode="bilinear")
            return labels, probabilities[0].float().cpu().numpy()
        return labels

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", overrides: list[str] | None = None
    ) -> Segmenter:
        """Head from `path` on its verified backbone; `overrides` e.g. ["backbone.dtype=bfloat16"]."""
        return _restore(cls, path, device, "segmentation", overrides)


def place_model(model: Classifier | Segmenter, device: str | torch.device) -> Classifier | Segmenter:
    """Move `model` to `device`. On CUDA a segmentation head's convolutions run channels_last, the layout of
    cuDNN's tensor-core kernels (`benchmarks/heads.py` measures it); on CPU it measured 0.9-1.1x, so no."""
    model = model.to(device)
    if isinstance(model, Segmenter) and torch.device(device).type == "cuda":
        model.head.to(memory_format=torch.channels_last)
    return model


def checkpoint_config(checkpoint: HeadCheckpoint, path: str | Path, overrides: list[str] | None) -> Config:
    """The checkpoint's own config with overrides on top (a new data.root, backbone.dtype=bfloat16, ...).

    Overrides of settings the head was trained with are refused: they would load without error and
    silently predict garbage, or fail deep inside `load_state_dict`.
    """
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        for fixed in TRAINED_SETTINGS:
            if key == fixed or key.startswith(fixed + ".") or fixed.startswith(key + "."):
                raise UserError(f"{path}: '{key}' is fixed by the trained head and cannot be overridden; train a new head instead")
    config = with_overrides(checkpoint.config, overrides, str(path))
    check_head_name(config, str(path))
    return config


def check_head_name(config: Config, source: str) -> None:
    """The head a config names exists for its task (a checkpoint's config is checked as strictly as a file)."""
    if config.task == "classification" and config.head.name != "linear":
        raise UserError(f"{source}: head '{config.head.name}' is a segmentation head; classification uses head.name: linear")
    if config.task != "classification":
        try:
            head_class(config.head.name)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None


def _restore(model_class, path: str | Path, device: str | torch.device, task: str, overrides: list[str] | None):
    """Rebuild a model from a head-only checkpoint: the same backbone weights (verified), then the head."""
    checkpoint = read_checkpoint(path, expected_task=task)
    config = checkpoint_config(checkpoint, path, overrides)
    config.backbone.weights = resolve_backbone_weights(checkpoint, path, config.backbone.weights)
    device = resolve_device(device)
    backbone = backbone_from_config(config, device, inference=True)
    add_adapters(backbone, config.backbone)  # LoRA / DoRA layers, filled from the checkpoint below
    model = model_class(backbone, checkpoint.num_classes, config, checkpoint.class_names)
    try:
        model.head.load_state_dict(checkpoint.head_state_dict)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), str(error).splitlines()[0])  # fmt: skip
        raise UserError(
            f"{path}: its head weights do not fit the head its own config describes ({detail[:200]}); the file "
            "was damaged or edited: use the checkpoint as training wrote it"
        ) from None
    load_trained_weights(backbone, checkpoint.backbone_state_dict)
    return place_model(model, device).eval()


def load_model(
    path: str | Path, device: str | torch.device = "auto", overrides: list[str] | None = None
) -> Classifier | Segmenter:
    """Either model, whichever task the checkpoint was trained for, on `device` (auto: the first GPU if any,
    see `resolve_device`); `overrides` as in `checkpoint_config`, e.g. ["backbone.dtype=float32"]."""
    return model_class(read_checkpoint(path).task).from_checkpoint(path, device, overrides)


TASK_MODELS = {"classification": "Classifier", "segmentation": "Segmenter", "depth": "dinov3ds.models.depth:DepthEstimator"}


def model_class(task: str) -> type[_TaskModel]:
    """The model of a task, from the registry above: a class of this module, or one in a module of its own
    named as `module:Class` (that module builds on this one, so it is imported when asked for)."""
    module, _, name = TASK_MODELS[task].rpartition(":")
    return getattr(importlib.import_module(module), name) if module else globals()[name]
