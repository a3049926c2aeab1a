"""Filling a model built on the meta device, one tensor at a time, in the dtype asked for.

Each parameter is allocated once, in the target dtype and on the target device; each tensor of the file is
read, cast into its place and let go before the next is read. Peak memory is the model in its dtype plus
one tensor of the file (a 7B backbone in bf16: 13.4 GB, whatever the file's own dtype or size).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.models.variants import BackboneSpec
from dinov3ds.models.weights.files import TensorFile
from dinov3ds.models.weights.mapping import Placement


def create_model(spec: BackboneSpec, overrides: dict) -> nn.Module:
    """timm's architecture for `spec` (no classifier), built on the current default device and dtype."""
    kwargs = {**dict(spec.timm_kwargs), **overrides}
    if spec.family == "convnext" and "depth" in kwargs:
        depth = kwargs.pop("depth")
        kwargs["depths"] = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * 4
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise UserError(f"invalid architecture override for {spec.name}: {error}") from None


def empty_model(spec: BackboneSpec, overrides: dict) -> nn.Module:
    """The architecture with no storage at all: its weights come from the file."""
    with torch.device("meta"):
        return create_model(spec, overrides)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# Random weights are drawn in float32 and cast, so a head trained on them meets the same backbone in any
# dtype; above this many parameters (only the 7B variants: 27 GB in float32) they are drawn in the target
# dtype directly, the one way they fit a 24 GB machine.
DRAW_IN_TARGET_DTYPE_ABOVE = 2_000_000_000


def random_model(spec: BackboneSpec, overrides: dict, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Deterministic random weights (smoke tests and demos), in `dtype`. timm keeps RoPE periods in float32
    whatever the default dtype."""
    size = sum(parameter.numel() for parameter in empty_model(spec, overrides).parameters())
    draw_dtype = dtype if size > DRAW_IN_TARGET_DTYPE_ABOVE else torch.float32
    with torch.random.fork_rng(devices=[]), _default_dtype(draw_dtype):
        torch.manual_seed(seed)
        return create_model(spec, overrides).to(dtype)


def fill(model: nn.Module, tensors: TensorFile, placements: list[Placement], dtype: torch.dtype,
         device: str | torch.device) -> None:
    """Stream every placed tensor of `tensors` into `model` (on the meta device) and compute its buffers."""
    targets = model.state_dict()  # meta tensors: names, shapes and the dtypes of non-float entries
    filled = {name: torch.zeros(meta.shape, dtype=dtype if meta.is_floating_point() else meta.dtype, device=device)
              for name, meta in targets.items()}  # fmt: skip
    by_source: dict[str, list[Placement]] = defaultdict(list)
    for placement in placements:
        by_source[placement.source].append(placement)
    for source, its_placements in by_source.items():
        tensor = tensors.read(source)
        for placement in its_placements:
            part = tensor if placement.source_rows is None else tensor[slice(*placement.source_rows)]
            destination = filled[placement.target]
            if placement.target_rows is not None:
                destination = destination[slice(*placement.target_rows)]
            destination.copy_(part.reshape(destination.shape))
        tensors.release(source, tensor)
        del tensor
    model.load_state_dict(filled, strict=True, assign=True)
    _materialize_buffers(model, dtype, device)


def _materialize_buffers(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> None:
    """Buffers not in the weights (RoPE periods, zero k-bias) are still on the meta device: compute them."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                keep_fp32 = name == "periods"  # timm keeps RoPE periods in float32 for accuracy
                module._buffers[name] = torch.empty(
                    buffer.shape, dtype=torch.float32 if keep_fp32 else dtype, device=device
                )
    reinit_non_persistent_buffers(model)
