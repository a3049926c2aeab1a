"""Backbone weights, read in one direction, each step once:

    sources  (where the bytes are: a path, checkpoints/, the Hub cache; regular file; SHA-256 prefix)
      → files    (which tensors, by name and shape; read one at a time: .pth mmap, safetensors pread, folders)
      → formats  (Meta / timm / transformers, by keys; the variant checked against what the file holds)
      → mapping  (each tensor's place in the timm model, from names and shapes only)
      → streaming (into the model built on the meta device, cast to the asked dtype, one tensor at a time)
"""

from __future__ import annotations

import torch
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.models.variants import BackboneSpec
from dinov3ds.models.weights import formats, mapping, streaming
from dinov3ds.models.weights.files import TensorFile
from dinov3ds.models.weights.hashes import weights_digest
from dinov3ds.models.weights.sources import find_source, sources_found
from dinov3ds.models.weights.streaming import random_model

__all__ = ["find_source", "load_weights", "random_model", "sources_found", "weights_digest"]


def load_weights(
    spec: BackboneSpec, weights: str | None, overrides: dict, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The model for `spec` filled from `weights` (see `sources.find_source`) in `dtype` on `device`, and its
    identity (what a head checkpoint records about it)."""
    source = find_source(spec, weights)
    with TensorFile(source.path) as tensors:
        layout = formats.identify(tensors.shapes, spec, overrides, source.path)
        model = streaming.empty_model(spec, overrides)
        targets = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        placements = mapping.plan(tensors.shapes, layout, targets)
        problems = mapping.mismatches(placements, tensors.shapes, targets)
        if problems:
            raise UserError(
                f"{source.path} does not fit '{spec.name}' ({formats.describe(tensors.shapes)['summary']}; first "
                f"mismatch: {problems[0]}); use the official weights of {spec.name} or the backbone name that matches the file"
            )
        streaming.fill(model, tensors, placements, dtype, device)
    identity = {"name": spec.name, "weights": source.label, "source": layout.format,
                "sha256": weights_digest(source.path), "overrides": overrides}  # fmt: skip
    return model, identity
