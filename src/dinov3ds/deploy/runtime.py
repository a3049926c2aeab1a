"""An exported dinov3ds file run by onnxruntime with numpy arrays: no PyTorch import here, so a server that only
answers requests needs onnxruntime and numpy (the README shows the same without dinov3ds at all).

    model = OnnxModel("seg.onnx", device="cpu")
    logits = model.logits(images)            # float32 [B,3,H,W], normalised as model.facts says
    model.facts.class_names, model.facts.mean, model.facts.input_multiple
    metres = OnnxModel("depth.onnx").depth(images)  # a depth file: [B,1,H,W] in metres, model.facts.depth its range
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dinov3ds.deploy.metadata import ServingFacts
from dinov3ds.errors import UserError

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers_for(device: str) -> list:
    """onnxruntime execution providers for a `--device`: `cpu`; `cuda` / `cuda:N` (TensorRT, then CUDA, when
    this onnxruntime has them, the CPU for any op they lack); `auto`: the GPU ones when present, else the CPU."""
    import onnxruntime

    name = (device or "auto").strip().lower()
    found = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", name)
    if found is None or (found.group(2) and found.group(1) != "cuda"):
        raise UserError(f"--device {device!r}: an ONNX file runs on auto, cpu, cuda or cuda:N")
    gpu = [provider for provider in GPU_PROVIDERS if provider in onnxruntime.get_available_providers()]
    if found.group(1) == "cpu" or (found.group(1) == "auto" and not gpu):
        return ["CPUExecutionProvider"]
    if not gpu:
        raise UserError(f"--device {device}: this onnxruntime has no CUDA provider; install onnxruntime-gpu, or use --device cpu")
    options = {"device_id": int(found.group(2) or 0)}
    return [*((provider, options) for provider in gpu), "CPUExecutionProvider"]


class OnnxModel:
    """One exported file: its onnxruntime session and the serving facts from its metadata."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path} is not a file; pass the .onnx file `dinov3ds export` wrote")
        try:
            import onnxruntime
        except ImportError:
            raise UserError("running an .onnx file needs onnxruntime: pip install 'dinov3ds[export]'") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: the CPU fallback of a GPU provider is not news
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=providers_for(device))
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types are not public
            detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            raise UserError(f"{self.path} is not an ONNX model onnxruntime can load ({detail}); "
                            "export it again with `dinov3ds export`") from None  # fmt: skip
        self.facts = ServingFacts.from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.providers = self.session.get_providers()

    def depth(self, images: np.ndarray) -> np.ndarray:
        """Depth in metres (float32 [B,1,H,W], at the input's size) for a normalised batch, from a depth file."""
        if self.facts.task != "depth":
            raise UserError(f"{self.path} is a {self.facts.task} model, not a depth model; read its logits()")
        return self.logits(images)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The graph's output (float32) for a normalised float32 batch [B,3,H,W] of the sizes the file accepts:
        logits, or a depth file's metres."""
        height, width = images.shape[-2:]
        multiple, fixed = self.facts.input_multiple, self.facts.input_size
        if fixed is not None and [height, width] != list(fixed):
            raise UserError(f"{self.path} was exported for {fixed[0]}x{fixed[1]} inputs, not {height}x{width}; "
                            "resize the image, or export without --height/--width")  # fmt: skip
        if height % multiple or width % multiple:
            raise UserError(f"input size {height}x{width} is not a multiple of {multiple} for {self.path}; resize the image")
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {"images": batch})[0].astype(np.float32, copy=False)
