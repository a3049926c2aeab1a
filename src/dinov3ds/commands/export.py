"""`dinov3ds export`: backbone + head as one graph (ONNX or TorchScript), checked against PyTorch.

RoPE positions are computed for the exported height and width, so a graph is valid for that input size;
export once per size you serve. The batch dimension can be dynamic.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dinov3ds.commands.output_files import OutputFolder
from dinov3ds.errors import UserError
from dinov3ds.models.finetune import merge_adapters
from dinov3ds.models.tasks import Classifier, Segmenter, load_model

logger = logging.getLogger("dinov3ds")


class ExportedModel(nn.Module):
    """Normalised images [B,3,H,W] in; classification logits [B,K] or segmentation logits [B,K,H,W] out."""

    def __init__(self, model: Classifier | Segmenter):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def _example(model: Classifier | Segmenter, height: int, width: int, batch: int) -> Tensor:
    multiple = model.input_multiple
    if height % multiple or width % multiple:
        raise UserError(f"export size {height}x{width} is not a multiple of {multiple}; choose --height/--width accordingly")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator).to(model.device)


def export_onnx(model: Classifier | Segmenter, out: Path, height: int, width: int, dynamic_batch: bool = False,
                opset: int = 17, metadata: dict | None = None) -> float:  # fmt: skip
    """Write an ONNX graph and return the max abs difference to PyTorch on random input (onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the export extra: pip install 'dinov3ds[export]'") from None
    wrapper = ExportedModel(model.float()).eval()
    example = _example(model, height, width, batch=1)
    check = _example(model, height, width, batch=2 if dynamic_batch else 1)
    with torch.no_grad():
        expected = wrapper(check).cpu().numpy()  # before LoRA / DoRA updates are merged: the graph must equal this
    merge_adapters(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python in timm; sizes are fixed
        torch.onnx.export(
            wrapper, (example,), str(out), dynamo=False, opset_version=opset, input_names=["images"],
            output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
        )  # fmt: skip
    wrapper.eval()  # the exporter restores the wrapper's own (training) mode on every submodule
    if metadata:
        _add_metadata(out, metadata)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    produced = session.run(None, {"images": check.cpu().numpy()})[0]
    return float(np.abs(produced - expected).max())


def _add_metadata(path: Path, metadata: dict) -> None:
    """Store the serving facts in the ONNX file's own metadata_props (readable with onnx or onnxruntime)."""
    import onnx

    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = f"dinov3ds.{key}", json.dumps(value)
    onnx.save(graph, str(path))


def export_torchscript(model: Classifier | Segmenter, out: Path, height: int, width: int) -> float:
    """Trace to TorchScript and return the max abs difference to eager PyTorch on another random input."""
    wrapper = ExportedModel(model.float()).eval()
    example, check = _example(model, height, width, batch=1), _example(model, height, width, batch=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        expected = wrapper(check)  # before LoRA / DoRA updates are merged
        merge_adapters(model)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(out))
        return float((torch.jit.load(str(out), map_location=check.device)(check) - expected).abs().max())


def serving_facts(model: Classifier | Segmenter, height: int, width: int) -> dict:
    """What a server must do to the image before the graph, and how to read its output."""
    config = model.config
    resize = (f"shorter side to {round(config.data.image_size / (224 / 256))}, centre crop {config.data.image_size}"
              if isinstance(model, Classifier)
              else f"resize to {height}x{width} (bilinear, antialiased); upsample the logits back to the image")  # fmt: skip
    return {
        "task": config.task,
        "input": {"name": "images", "shape": ["batch", 3, height, width], "dtype": "float32",
                  "channels": "RGB", "scale": "pixels / 255", "mean": list(model.backbone.mean),
                  "std": list(model.backbone.std), "resize": resize},  # fmt: skip
        "output": {"name": "logits", "meaning": "class scores (softmax for probabilities)"},
        "class_names": list(model.class_names),
        "backbone": model.backbone.identity["name"],
    }


def export(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", height: int | None = None,
           width: int | None = None, dynamic_batch: bool = False, overwrite: bool = False,
           device: str = "auto") -> float:  # fmt: skip
    """Export a checkpoint, and beside it `<out>.json` with the preprocessing and class names (also in the ONNX
    graph's metadata); prints and returns the max error against PyTorch. The graph is traced in float32 on
    `device` (the graph itself runs anywhere); onnxruntime checks it on the CPU."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"export format {fmt!r} is unknown; use onnx or torchscript")
    out = Path(out)
    folder = OutputFolder(out.parent, inputs=[Path(checkpoint)], overwrite=overwrite)
    out, facts_path = folder.claim(out.name), folder.claim(out.name + ".json")
    model = load_model(checkpoint, device=device, overrides=["backbone.dtype=float32"])
    size = model.config.data.image_size
    height, width = height or size, width or size
    facts = serving_facts(model, height, width)
    if fmt == "onnx":
        error = export_onnx(model, out, height, width, dynamic_batch, metadata=facts)
    else:
        error = export_torchscript(model, out, height, width)
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"wrote {out} ({fmt}, input 3x{height}x{width}) and {facts_path.name}; max abs error vs PyTorch: {error:.3g}")
    return error
