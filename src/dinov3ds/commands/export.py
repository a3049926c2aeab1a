"""`dinov3ds export`: a checkpoint as one ONNX file (any size unless --height/--width fix one; fp16 with
--half) or a TorchScript trace, written under its own name only when complete, with what was written and how
closely it matches PyTorch printed. The work is in `dinov3ds.deploy`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dinov3ds.commands.output_files import OutputFolder, staged
from dinov3ds.deploy.metadata import facts_of
from dinov3ds.deploy.onnx_export import OnnxExport, check_size, export_onnx
from dinov3ds.deploy.torchscript import export_torchscript
from dinov3ds.errors import UserError
from dinov3ds.models.tasks import load_model


def _megabytes(paths: list[Path]) -> str:
    return f"{sum(path.stat().st_size for path in paths) / 2**20:.1f} MB"


def _shape(dims: list) -> str:
    return "[" + ", ".join(str(dim) for dim in dims) + "]"


def report(result: OnnxExport) -> None:
    """What a user needs to serve the file: where, how big, the tensors, and how far it is from PyTorch."""
    facts = result.facts
    sizes = f"{facts.input_size[0]}x{facts.input_size[1]} only" if facts.input_size else f"any multiple of {facts.input_multiple}"
    size = _megabytes(result.files)
    if facts.precision == "float16":
        size += f", {sum(path.stat().st_size for path in result.files) / result.float32_bytes:.2f} of float32"
    depth = facts.task == "depth"
    what = (f"depth in metres, {facts.depth['min_depth']:g} to {facts.depth['max_depth']:g} m" if depth
            else f"{facts.task}, {len(facts.class_names)} classes")  # fmt: skip
    print(f"wrote {result.path} ({size}, {facts.precision}, {what}, height and width: {sizes})")
    for role, (name, dims) in [("input ", item) for item in result.inputs] + [("output", item) for item in result.outputs]:
        print(f"  {role} {name}: float32 {_shape(dims)}" + (" metres" if depth and role == "output" else ""))
    print(f"  preprocessing and {'depth range' if depth else 'class names'}: the file's metadata (dinov3ds.*); RGB / 255, "
          f"mean {facts.mean}, std {facts.std}")  # fmt: skip
    print("  parity with PyTorch float32 (onnxruntime CPU, random batch), max abs difference:")
    for item in result.parity:
        shape = f"{'x'.join(map(str, item.shape)):<14}"
        if item.metres is not None:
            print(f"    {shape} depth {item.metres:.2e} m  ({item.range_fraction:.2e} of max_depth)")
        else:
            print(f"    {shape} logits {item.logits:.2e}  probabilities {item.probabilities:.2e}")


def export(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", height: int | None = None,
           width: int | None = None, half: bool = False, overwrite: bool = False, device: str = "auto") -> None:  # fmt: skip
    """Export a checkpoint to `out`. The graph is traced in float32 on `device` (it runs anywhere afterwards);
    onnxruntime checks it on the CPU. TorchScript carries no metadata: `<out>.json` holds the same facts."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"export format {fmt!r} is unknown; use onnx or torchscript")
    if half and fmt != "onnx":
        raise UserError("--half writes an fp16 ONNX graph; drop --half for TorchScript (or use --format onnx)")
    out = Path(out)
    folder = OutputFolder(out.parent, inputs=[Path(checkpoint)], overwrite=overwrite)
    target = folder.claim(out.name)
    if fmt == "onnx":
        model = load_model(checkpoint, device=device, overrides=["backbone.dtype=float32"])
        with folder.staged_files() as stage:  # the graph and any <out>.data renamed into place together
            result = export_onnx(model, stage / out.name, height, width, half=half)
        files = [target.with_name(file.name) for file in result.files]
        report(dataclasses.replace(result, path=target, files=files))
        return
    facts_path = folder.claim(out.name + ".json")
    model = load_model(checkpoint, device=device, overrides=["backbone.dtype=float32"])
    size = check_size(model, height, width) or (model.config.data.image_size,) * 2
    with staged(target) as temporary:
        error = export_torchscript(model, temporary, *size)
    facts = dataclasses.asdict(facts_of(model, size, "float32"))
    with staged(facts_path) as temporary:
        temporary.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"wrote {target} (torchscript, {_megabytes([target])}, input [batch, 3, {size[0]}, {size[1]}]) and "
          f"{facts_path.name} (preprocessing, class names); max abs difference to PyTorch: {error:.2e}")  # fmt: skip
