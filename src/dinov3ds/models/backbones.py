"""DINOv3 backbones: a frozen model of any official variant with its final-norm outputs and feature taps.

Every variant is timm's architecture filled from the weights the user has (`models.weights`). Parity with
Meta's implementation is proven by `tests/test_backbone_parity.py` against the reference outputs in
`shared/fixtures`, and with timm's and transformers' own forwards by `tests/test_weight_sources.py`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import TokenSource
from dinov3ds.models.hardware import resolve_device, slow_dtype_message
from dinov3ds.models.variants import BackboneSpec, get_spec
from dinov3ds.models.weights import load_weights, random_model

logger = logging.getLogger("dinov3ds")

class BackboneOutput(NamedTuple):
    """Final-norm outputs, named after Meta's ``x_norm_clstoken`` / ``x_norm_patchtokens`` / ``x_storage_tokens``."""

    cls: Tensor  # [B, C]
    patches: Tensor  # [B, C, H/stride, W/stride]
    registers: Tensor  # [B, R, C]; R = 0 for ConvNeXt


class Backbone(nn.Module):
    """A frozen DINOv3 backbone with multi-layer features.

    The backbone is frozen here, in one visible place: no parameter needs a gradient and `train()` keeps it
    in eval mode, so a head's training never updates its norms or dropout. ConvNeXt variants give their
    four stage maps (strides 4, 8, 16, 32) through the same interface; their `patches` are the last stage.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, identity: dict):
        super().__init__()
        self.spec = spec
        self.model = model
        self.identity = identity
        # the built model's width: an `embed_dim` override (reduced test models, EoMT folders) changes it
        self.embed_dim = int(model.embed_dim) if spec.family == "vit" else spec.embed_dim
        self.patch_size = spec.patch_size
        self.input_multiple = spec.input_multiple
        self.default_layers = spec.default_layers
        self.mean = spec.mean
        self.std = spec.std
        self.num_registers = int(model.num_prefix_tokens) - 1 if spec.family == "vit" else 0
        self.trains = False  # set by models.finetune: a backbone that trains follows train() (LoRA dropout)
        self.requires_grad_(False)
        self.eval()

    @property
    def depth(self) -> int:
        return len(self.model.blocks) if self.spec.family == "vit" else len(self.model.stages)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode: it must behave as it did in pretraining evaluation."""
        return super().train(mode and self.trains)

    def feature_channels(self, layers: list[int] | tuple[int, ...] | None = None) -> list[int]:
        layers = self.resolve_layers(layers)
        if self.spec.family == "vit":
            return [self.embed_dim] * len(layers)
        return [self.spec.stage_dims[i] for i in layers]

    def feature_strides(self, layers: list[int] | tuple[int, ...] | None = None) -> list[int]:
        layers = self.resolve_layers(layers)
        if self.spec.family == "vit":
            return [16] * len(layers)
        return [4 * 2**i for i in layers]

    def resolve_layers(self, layers: list[int] | tuple[int, ...] | None) -> list[int]:
        """Default taps when None; negative indices count from the end; out-of-range is a user error."""
        if layers is None:
            layers = self.default_layers
            if max(layers) >= self.depth:  # a reduced test model: four even intervals of its own depth
                layers = tuple(max(0, math.ceil(self.depth * (i + 1) / 4) - 1) for i in range(4))
        resolved = [i % self.depth if -self.depth <= i < 0 else i for i in layers]
        bad = [i for i in resolved if not 0 <= i < self.depth]
        if bad:
            raise UserError(f"layers {bad} out of range for {self.spec.name} (depth {self.depth}); use 0..{self.depth - 1}")
        return resolved

    @property
    def blocks(self) -> list[nn.Module]:
        """Transformer blocks (ViT) or stages (ConvNeXt), input side first."""
        return list(self.model.blocks if self.spec.family == "vit" else self.model.stages)

    def unfreeze_last_blocks(self, count: int) -> list[nn.Module]:
        """Let the last `count` blocks (and the final norm) train; returns them, input side first.

        The backbone stays in eval mode (DINOv3 has no BatchNorm or dropout to switch), and earlier blocks
        still run without a graph, so only the unfrozen part keeps activations for backward.
        """
        if not 0 <= count <= self.depth:
            raise UserError(f"backbone.unfreeze_last_blocks={count} is out of range for {self.spec.name}; use 0..{self.depth}")
        unfrozen = self.blocks[self.depth - count :] if count else []
        for block in unfrozen:
            block.requires_grad_(True)
        if count:
            final_norm = self.model.norm if self.spec.family == "vit" else self.model.head.norm
            final_norm.requires_grad_(True)
        return unfrozen

    def token_source(self) -> TokenSource | None:
        """Head count, prefix tokens and RoPE for heads that run blocks of their own on the ViT's tokens, and
        the blocks and final norm themselves for a head that runs the last ones (eomt)."""
        if self.spec.family != "vit":
            return None
        attention, rope = self.model.blocks[0].attn, self.model.rope
        return TokenSource(
            num_heads=attention.num_heads,
            num_prefix_tokens=int(self.model.num_prefix_tokens),
            rotate_half=bool(getattr(attention, "rotate_half", False)),
            rope=(lambda height, width: rope.get_embed(shape=(height, width))) if rope is not None else None,
            blocks=tuple(self.model.blocks),
            norm=self.model.norm,
        )

    def compile_blocks(self, example: Tensor) -> bool:
        """torch.compile each block (every feature path runs through them); eager again if compiling fails.

        Returns whether the compiled blocks ran on `example`.
        """
        blocks = self.blocks
        for block in blocks:
            block.compile(dynamic=True)
        try:
            with torch.no_grad():
                self.get_intermediate_layers(example, [self.depth - 1])
            return True
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
            logger.warning("torch.compile failed (%s); running the backbone eagerly", str(error).splitlines()[0][:200])
            for block in blocks:
                block._compiled_call_impl = None
            return False

    def _check_input(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise UserError(
                f"input size {height}x{width} is not a multiple of {self.input_multiple} for {self.spec.name}; "
                "resize or pad the image (the dinov3ds transforms do this)"
            )
        return images.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def forward(self, images: Tensor) -> BackboneOutput:
        images = self._check_input(images)
        if self.spec.family == "convnext":
            final = self.model.forward_features(images)
            norm = self.model.head.norm
            return BackboneOutput(
                norm(final.mean((-2, -1), keepdim=True)).flatten(1),
                norm(final),
                final.new_zeros(final.shape[0], 0, final.shape[1]),
            )
        tokens = self.model.forward_features(images)
        prefix = 1 + self.num_registers
        h, w = images.shape[-2] // 16, images.shape[-1] // 16
        patches = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return BackboneOutput(tokens[:, 0], patches, tokens[:, 1:prefix])

    def get_intermediate_layers(
        self,
        images: Tensor,
        layers: list[int] | tuple[int, ...] | None = None,
        norm: bool = True,
        return_registers: bool = False,
    ) -> list[tuple[Tensor, ...]]:
        """Per requested block (0-based): ``(patches NCHW, cls)`` or, with registers, ``(patches, cls, registers)``.

        Matches Meta's ``get_intermediate_layers(..., reshape=True, return_class_token=True, norm=norm)``:
        every tap goes through the final LayerNorm. ConvNeXt taps are stage maps; as in Meta's code only the
        last stage has a norm, and its "cls" is the spatial mean passed through that stage's norm.
        """
        images = self._check_input(images)
        layers = self.resolve_layers(layers)
        if self.spec.family == "convnext":
            taps = self._convnext_layers(images, layers, norm)
            if return_registers:
                return [(patches, cls, cls.new_zeros(cls.shape[0], 0, cls.shape[1])) for patches, cls in taps]
            return taps
        unique = sorted(set(layers))  # a tap may repeat (reduced test models); compute each block once
        outputs = self.model.forward_intermediates(
            images, indices=unique, return_prefix_tokens=True, norm=norm, intermediates_only=True, stop_early=True
        )
        by_layer = dict(zip(unique, outputs))
        result = []
        for patches, prefix in (by_layer[i] for i in layers):
            item = (patches, prefix[:, 0], prefix[:, 1:]) if return_registers else (patches, prefix[:, 0])
            result.append(item)
        return result

    def _convnext_layers(self, images: Tensor, layers: list[int], norm: bool) -> list[tuple[Tensor, Tensor]]:
        x = self.model.stem(images)
        outputs: dict[int, tuple[Tensor, Tensor]] = {}
        for index, stage in enumerate(self.model.stages[: max(layers) + 1]):
            x = stage(x)
            if index in layers:
                stage_norm = self.model.head.norm if norm and index == len(self.model.stages) - 1 else nn.Identity()
                pooled = stage_norm(x.mean((-2, -1), keepdim=True)).flatten(1)
                outputs[index] = (stage_norm(x), pooled)
        return [outputs[i] for i in layers]


def _announce(message: str) -> None:
    """One line per load, on the channel the user sees: the Python warning where warnings are shown (scripts,
    notebooks, `pytest.warns`, `-W error` raises it), else the log line (the CLI hides library warnings). Both
    at once printed every line twice in a script with `logging.basicConfig`. The filters decide: a warning
    they ignore is not caught here, and one they pass is shown once, each load (not once per call site)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(message, stacklevel=3)
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not caught:
        logger.warning(message)


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **arch_overrides,
) -> Backbone:
    """Build a frozen DINOv3 backbone from whichever official weights the user has.

    Args:
        name: variant, e.g. ``vits16`` or ``dinov3_vitl16``; see `VARIANTS`.
        weights: None: Meta's file in $DINOV3DS_CHECKPOINTS or ./checkpoints, else the variant's timm or
            transformers repo if it is in the Hugging Face cache; a path: Meta's ``.pth`` (its SHA-256 prefix is
            checked), a timm or transformers ``.safetensors`` file or model folder; ``"hf-hub:<repo>"``: from the
            Hub or its cache; ``"random"``: seeded random weights for tests and demos.
        dtype: parameter dtype (bf16 halves the memory of a frozen backbone).
        device: where the model lives (`auto`: the first GPU if any); weights are read straight onto it.
        **arch_overrides: timm architecture arguments, e.g. ``depth=2`` for the small reference models.
    """
    spec = get_spec(name)
    device = resolve_device(device)
    if isinstance(weights, str) and weights == "random":
        _announce(f"RANDOM WEIGHTS for {spec.name}: features are meaningless (tests and demos only)")
        model = random_model(spec, arch_overrides, seed=0, dtype=dtype)
        identity = {"name": spec.name, "weights": "random", "seed": 0, "overrides": arch_overrides}
    else:
        model, identity = load_weights(spec, weights, arch_overrides, dtype, device)
    slow = slow_dtype_message(dtype, device)
    if slow:
        _announce(slow)
    return Backbone(spec, model.to(device), identity)
