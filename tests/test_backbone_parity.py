"""Numerical parity with Meta's own DINOv3 implementation, on the shared reference fixtures.

Each fixture is a small random checkpoint in Meta's exact format with outputs computed by Meta's code;
loading it through `load_backbone` must reproduce every stored output.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.models.backbones import load_backbone
from tests.conftest import reference_dir

FIXTURES = {
    "vits16_d2": ("vits16", {"depth": 2}),
    "vits16plus_d2": ("vits16plus", {"depth": 2}),
    "vit7b16style_e256h2_d2": ("vit7b16", {"depth": 2, "embed_dim": 256, "num_heads": 2}),
    "convnext_tiny_d1111": ("convnext_tiny", {"depth": 1}),
}
INPUTS = ("b2_224x224", "b1_160x240")  # the non-square input catches RoPE H/W mix-ups


def _load(fixture: str, dtype: torch.dtype = torch.float32):
    folder = reference_dir()
    meta = json.loads((folder / f"dinov3_{fixture}.json").read_text())
    name, overrides = FIXTURES[fixture]
    backbone = load_backbone(name, folder / meta["checkpoint_file"], dtype=dtype, **overrides)
    reference = torch.load(folder / meta["outputs_file"], weights_only=True)
    inputs = torch.load(folder / "dinov3_fixture_inputs.pt", weights_only=True)
    return backbone, meta, reference, inputs


def _outputs(backbone, meta, images) -> dict[str, torch.Tensor]:
    """Our outputs under Meta's key names."""
    with torch.inference_mode():
        final = backbone(images)
        layers = meta["intermediate_block_indices"]
        taps = backbone.get_intermediate_layers(images, layers, norm=True, return_registers=True)
    result = {
        "forward_features.x_norm_clstoken": final.cls,
        "forward_features.x_norm_patchtokens": final.patches.flatten(2).transpose(1, 2),
        "forward_features.x_storage_tokens": final.registers,
    }
    for index, (patches, cls, registers) in zip(layers, taps):
        result[f"intermediate.{index}.patch"] = patches
        result[f"intermediate.{index}.cls"] = cls
        if backbone.spec.family == "vit":
            result[f"intermediate.{index}.storage"] = registers
    return {k: v.float() for k, v in result.items()}


@pytest.mark.parametrize("fixture", FIXTURES)
def test_float32_matches_meta(fixture):
    backbone, meta, reference, inputs = _load(fixture)
    for input_name in INPUTS:
        ours = _outputs(backbone, meta, inputs[f"input.{input_name}"])
        expected = {k.removeprefix(f"{input_name}."): v for k, v in reference.items() if k.startswith(input_name)}
        assert set(expected) == set(ours), set(expected) ^ set(ours)
        for key, value in expected.items():
            assert ours[key].shape == value.shape, key
            error = (ours[key] - value).abs().max().item() if value.numel() else 0.0
            assert error <= 1e-4, f"{fixture} {input_name} {key}: max abs error {error}"


@pytest.mark.parametrize("fixture", ["vits16_d2", "vit7b16style_e256h2_d2", "convnext_tiny_d1111"])
def test_bfloat16_close_to_meta(fixture):
    """bf16 weights and activations: patch features keep cosine similarity >= 0.99 with Meta's fp32."""
    backbone, meta, reference, inputs = _load(fixture, dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16
    for input_name in INPUTS:
        ours = _outputs(backbone, meta, inputs[f"input.{input_name}"])
        for key in ("forward_features.x_norm_patchtokens", "forward_features.x_norm_clstoken"):
            expected = reference[f"{input_name}.{key}"]
            similarity = F.cosine_similarity(ours[key].flatten(0, -2), expected.flatten(0, -2), dim=-1)
            assert similarity.min().item() >= 0.99, f"{fixture} {key}: min cosine {similarity.min().item():.4f}"
