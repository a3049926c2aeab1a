"""From a variant and a weight source to a filled timm model: where the weights are, and loading them.

A source is Meta's `.pth`, a timm or transformers safetensors file or folder, or a Hub id (`hf-hub:...`);
with none given, Meta's file in checkpoints/ is used, else the variant's timm or transformers repo if it
is already in the Hugging Face cache. The model is built on the meta device and the (memory-mapped)
tensors are assigned in the requested dtype, so loading costs about one copy of the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.models import hub, weight_formats
from dinov3ds.models.variants import BackboneSpec, checkpoint_dirs, find_weight_file
from dinov3ds.models.weights import load_state_dict_file, verify_hash, weights_digest

logger = logging.getLogger("dinov3ds")


@dataclass(frozen=True)
class WeightSource:
    path: Path  # a weight file or a model folder on this machine
    label: str  # what a checkpoint records to find it again: a file or folder name, or the hf-hub: id


def create_model(spec: BackboneSpec, overrides: dict) -> nn.Module:
    kwargs = {**dict(spec.timm_kwargs), **overrides}
    if spec.family == "convnext" and "depth" in kwargs:
        depth = kwargs.pop("depth")
        kwargs["depths"] = tuple(depth) if isinstance(depth, (list, tuple)) else (depth,) * 4
    try:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise UserError(f"invalid architecture override for {spec.name}: {error}") from None


def random_model(spec: BackboneSpec, overrides: dict, seed: int) -> nn.Module:
    """Deterministic random weights, so a head trained on them can be reloaded with the same backbone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(spec, overrides)


def find_source(spec: BackboneSpec, weights: str | Path | None) -> WeightSource:
    """Where the weights for `spec` are: the given path or Hub id, else the default places in order."""
    if hub.is_hub_id(weights):
        return WeightSource(hub.resolve(str(weights)), str(weights))
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise UserError(f"weight file {path} not found; check the path (official name: {spec.weight_file})")
        return WeightSource(path, path.name)
    official = find_weight_file(spec)
    if official is not None:
        return WeightSource(official, official.name)
    for repo in (spec.timm_hub_id, spec.transformers_hub_id):
        cached = hub.cached_snapshot(repo) if repo else None
        if cached is not None:
            logger.info("%s: Meta's file is not in checkpoints/, using hf-hub:%s from the Hugging Face cache", spec.name, repo)
            return WeightSource(cached, f"{hub.PREFIX}{repo}")
    places = " or ".join(str(d / spec.weight_file) for d in checkpoint_dirs())
    timm_hint = f"backbone.weights=hf-hub:{spec.timm_hub_id} (timm, no access form), " if spec.timm_hub_id else ""
    raise UserError(
        f"no weights for {spec.name}: put Meta's file at {places} (request it at {spec.url}), or set "
        f"{timm_hint}backbone.weights=hf-hub:{spec.transformers_hub_id} (transformers), or a local file or "
        "folder; weights: random for a smoke test"
    )


def sources_found(spec: BackboneSpec) -> list[str]:
    """Which of the variant's official sources are on this machine (no network): meta, timm, transformers."""
    found = ["meta"] if find_weight_file(spec) else []
    found += ["timm"] if spec.timm_hub_id and hub.cached_snapshot(spec.timm_hub_id) else []
    return found + (["transformers"] if hub.cached_snapshot(spec.transformers_hub_id) else [])


def load_weights(
    spec: BackboneSpec, source: WeightSource, overrides: dict, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """The model filled from `source` on `device`, and its identity (what a head checkpoint records about it).
    The file is memory-mapped and each tensor goes straight to `device` in `dtype`: no full copy of the
    weights stays in host memory when they live on a GPU."""
    if source.path.is_file():
        verify_hash(source.path)  # Meta's names carry a SHA-256 prefix; checked (and cached) first
    with torch.device("meta"):
        model = create_model(spec, overrides)
    state = weight_formats.canonical(load_state_dict_file(source.path))
    layout = weight_formats.detect(state)
    found = weight_formats.describe(state)
    width_overridden = "embed_dim" in overrides or "dims" in overrides
    if layout is None or layout.family != spec.family or (found["embed_dim"] != spec.embed_dim and not width_overridden):
        raise UserError(
            f"{source.path} holds {found['summary']}, but backbone '{spec.name}' expects a {spec.family} of width "
            f"{spec.embed_dim} ({spec.weight_file}); set the backbone name that matches the file or use the right file"
        )
    converted = weight_formats.to_timm(state, layout, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [k for k in expected if k not in converted]
    problems += [k for k, v in converted.items() if expected.get(k) != tuple(v.shape)]
    if problems:
        raise UserError(
            f"{source.path} does not fit '{spec.name}' ({found['summary']}; first mismatch: {problems[0]}); use "
            f"the official weights of {spec.name} or the backbone name that matches the file"
        )
    converted = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    _materialize_buffers(model, dtype, device)
    identity = {"name": spec.name, "weights": source.label, "source": layout.format,
                "sha256": weights_digest(source.path), "overrides": overrides}  # fmt: skip
    return model, identity


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
