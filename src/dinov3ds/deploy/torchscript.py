"""TorchScript export: the model traced at one height and width (RoPE positions frozen for that size), any
batch, checked against eager PyTorch before LoRA / DoRA adapters are merged."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dinov3ds.deploy.onnx_export import ExportedModel, check_size
from dinov3ds.models.finetune import merge_adapters
from dinov3ds.models.tasks import Classifier, Segmenter


def export_torchscript(model: Classifier | Segmenter, path: str | Path, height: int | None = None,
                       width: int | None = None) -> float:  # fmt: skip
    """Trace `model` at `height` x `width` (default data.image_size) to `path`; return the max abs difference
    to eager PyTorch on another random batch."""
    size = check_size(model, height, width) or (model.config.data.image_size,) * 2
    wrapper = ExportedModel(model.float()).eval()
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.randn(batch, 3, *size, generator=generator).to(model.device) for batch in (1, 2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        expected = wrapper(check)  # before LoRA / DoRA updates are merged
        merge_adapters(model)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(path))
        return float((torch.jit.load(str(path), map_location=check.device)(check) - expected).abs().max())
