"""The ONNX graph of a dinov3ds model: images [B,3,H,W] in, logits (or a depth model's metres [B,1,H,W]) out,
for any batch, height and width (or one fixed size), its serving facts in the file's metadata, in float32 or
float16, checked against PyTorch.

The graph is traced with the TorchScript exporter (`dynamo=False`) under `traceable`, which keeps RoPE and
deformable attention's sizes as graph values; `torch.onnx.export(dynamo=True)` was tried first and dropped:
it took 8-70 s per tiny test model against 0.3-4 s, and failed outright on the `pmt` head. Every export is
then run in onnxruntime at three sizes (square, landscape, portrait; the one size of a fixed export) against
the PyTorch model as loaded, LoRA / DoRA adapters not yet merged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dinov3ds.data.transforms import round_to_multiple
from dinov3ds.deploy.half import to_half
from dinov3ds.deploy.metadata import ServingFacts, facts_of
from dinov3ds.deploy.traceable import traceable
from dinov3ds.errors import UserError
from dinov3ds.models.depth import DepthEstimator
from dinov3ds.models.finetune import merge_adapters
from dinov3ds.models.tasks import Classifier, Segmenter

Exportable = Classifier | Segmenter | DepthEstimator

OPSET = 17  # LayerNormalization as one op (TensorRT reads it as one layer)
# max |Δ probability| against PyTorch fp32; for depth max |Δ metres| / max_depth (depth = Σ probability x bin
# centre, so it is bounded by the probabilities' differences times max_depth)
TOLERANCE = {"float32": 1e-3, "float16": 5e-3}
PARITY_SIDE = 224  # the square check's side (or data.image_size when smaller; two input multiples at least)
INLINE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB limit, with room for the graph: beyond it weights go to <out>.data


class ExportedModel(nn.Module):
    """Normalised images [B,3,H,W] in; classification logits [B,K], segmentation logits [B,K,H,W] or depth in
    metres [B,1,H,W] out."""

    def __init__(self, model: Exportable):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


@dataclass(frozen=True)
class Parity:
    """Max abs differences between the graph in onnxruntime and PyTorch on one random batch: logits and
    probabilities, or for a depth model metres (and that as a fraction of max_depth, what TOLERANCE judges)."""

    shape: tuple[int, ...]
    logits: float | None
    probabilities: float | None
    metres: float | None = None
    range_fraction: float | None = None

    @property
    def judged(self) -> float:
        return self.probabilities if self.metres is None else self.range_fraction


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote and measured."""

    path: Path
    files: list[Path]  # the graph, and <name>.data when the weights pass 2 GiB
    facts: ServingFacts
    inputs: list[tuple[str, list]]  # (name, shape; a dimension is a number or a name such as "height")
    outputs: list[tuple[str, list]]
    parity: list[Parity]
    float32_bytes: int  # the float32 graph's size, before any fp16 conversion


def parity_shapes(model: Exportable, size: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """The batches the graph is checked on: square, landscape (batch 2) and portrait, or the fixed size."""
    if size is not None:
        return [(2, 3, *size)]
    multiple = model.input_multiple
    side = max(2 * multiple, round_to_multiple(min(PARITY_SIDE, model.config.data.image_size), multiple))
    long = round_to_multiple(side * 1.5, multiple)
    return [(1, 3, side, side), (2, 3, side, long), (1, 3, long, side)]


def check_size(model: Exportable, height: int | None, width: int | None) -> tuple[int, int] | None:
    """The fixed size `--height/--width` ask for (one given: the other is data.image_size), or None."""
    if height is None and width is None:
        return None
    size = model.config.data.image_size
    height, width = height or size, width or size
    multiple = model.input_multiple
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UserError(f"export size {height}x{width} is not a multiple of {multiple}; choose --height/--width accordingly")
    return height, width


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """The exporter's C++ side prints the whole TorchScript graph to stdout when an op fails: the CLI says one line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def output_name(model: Exportable) -> str:
    return "depth" if model.config.task == "depth" else "logits"


def _trace(model: Exportable, wrapper: nn.Module, path: Path, example: Tensor, dynamic: bool) -> None:
    """torch.onnx.export, with an op the exporter cannot write as one line naming the head and the op."""
    head, output = model.config.head.name, output_name(model)
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    outputs = {0: "batch"} if model.config.task == "classification" else axes
    try:
        with torch.no_grad(), traceable(wrapper), warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings: the parity check is the judge
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                              output_names=[output], dynamic_axes={"images": axes, output: outputs})  # fmt: skip
    except torch.onnx.errors.OnnxExporterError as error:
        found = re.search(r"operator '([\w:.]+)'", str(error))
        op = found.group(1) if found else str(error).strip().splitlines()[0][:120]
        raise UserError(f"head '{head}' cannot be exported to ONNX: operator {op} has no ONNX opset {OPSET} form; "
                        "export with --format torchscript, or use another head") from None  # fmt: skip
    finally:
        wrapper.eval()  # the exporter restores the wrapper's own (training) mode on every submodule


def _save(graph, path: Path) -> list[Path]:
    """The graph at `path`; its weights in `<name>.data` beside it when they pass protobuf's 2 GiB."""
    import onnx

    weights = sum(tensor.ByteSize() for tensor in graph.graph.initializer)
    if weights < INLINE_LIMIT:
        onnx.save_model(graph, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _parity(batch: Tensor, produced: np.ndarray, reference: np.ndarray, facts: ServingFacts) -> Parity:
    """The differences of one batch: logits and probabilities, or a depth model's metres."""
    difference = float(np.abs(produced - reference).max())
    if facts.task == "depth":
        return Parity(tuple(batch.shape), None, None, difference, difference / facts.depth["max_depth"])
    return Parity(tuple(batch.shape), difference, float(np.abs(_softmax(produced) - _softmax(reference)).max()))


def _dims(values) -> list[tuple[str, list]]:
    return [(value.name, list(value.shape)) for value in values]


def export_onnx(model: Exportable, path: str | Path, height: int | None = None, width: int | None = None,
                half: bool = False) -> OnnxExport:  # fmt: skip
    """Write `model` as an ONNX graph at `path` (any size, or `height` x `width`; fp16 with `half`) and check it
    against PyTorch fp32 in onnxruntime on the CPU; a difference beyond TOLERANCE is an error."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the export extra: pip install 'dinov3ds[export]'") from None
    path = Path(path)
    size = check_size(model, height, width)
    precision = "float16" if half else "float32"
    wrapper = ExportedModel(model.float()).eval()
    generator = torch.Generator().manual_seed(0)
    checks = [torch.randn(shape, generator=generator) for shape in parity_shapes(model, size)]
    with torch.no_grad():  # before LoRA / DoRA updates are merged: the graph must equal this
        expected = [wrapper(batch.to(model.device)).float().cpu().numpy() for batch in checks]
    merge_adapters(model)
    multiple = model.input_multiple
    example = torch.randn(2, 3, *(size or (checks[0].shape[2] + multiple, checks[0].shape[3] + 2 * multiple)),
                          generator=generator).to(model.device)  # fmt: skip
    facts = facts_of(model, size, precision)
    with tempfile.TemporaryDirectory(prefix=".dinov3ds-export-", dir=path.parent) as scratch:
        raw = Path(scratch) / "graph.onnx"
        _trace(model, wrapper, raw, example, dynamic=size is None)
        graph = onnx.load(str(raw))
        float32_bytes = sum(file.stat().st_size for file in Path(scratch).iterdir())
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = len(facts.class_names)  # not a made-up name
    graph = to_half(graph, keep_output_tail=facts.task == "depth") if half else graph
    for key, value in facts.to_props().items():
        graph.metadata_props.add(key=key, value=value)
    files = _save(graph, path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parity = [_parity(batch, session.run(None, {"images": batch.numpy()})[0].astype(np.float32), reference, facts)
              for batch, reference in zip(checks, expected)]  # fmt: skip
    failing = [item for item in parity if not item.judged <= TOLERANCE[precision]]  # NaN fails too
    if failing:
        for file in files:
            file.unlink()
        worst = failing[0]
        fix = ("export without --half" if half else "export a fixed size with --height/--width" if size is None
               else "the head computes something the graph cannot hold; use --format torchscript")  # fmt: skip
        measure = (f"max |Δ probability| {worst.probabilities:.3g}" if worst.metres is None
                   else f"max |Δ depth| {worst.metres:.3g} m, {worst.range_fraction:.3g} of max_depth")  # fmt: skip
        raise UserError(f"head '{model.config.head.name}': the {precision} graph differs from PyTorch at "
                        f"{worst.shape[2]}x{worst.shape[3]} ({measure} > {TOLERANCE[precision]:g}); {fix}")  # fmt: skip
    return OnnxExport(path, files, facts, _dims(session.get_inputs()), _dims(session.get_outputs()), parity, float32_bytes)
