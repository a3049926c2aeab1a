"""Values, not shapes, for the heads without a hand-computed test in test_heads.py: each building block against
its definition written with torch.nn.functional (float64, eval mode, random BatchNorm statistics), then each
head's wiring as its reference wires those blocks (the seed's U-Net sums, DPT's top-down fusion), and the
structural choices a reference makes (widths, kernel sizes, which branch is an identity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinov3ds.heads import HEADS, TokenSource, build_head
from dinov3ds.heads import unet as unet_module
from dinov3ds.heads import unet_sum as unet_sum_module
from dinov3ds.heads.dpt import DPT_WIDTHS, FusionBlock, PreActResidualUnit

PIXEL_HEADS = sorted(name for name, cls in HEADS.items() if not cls.reads_tokens)
CONVNEXT = ([96, 192, 384, 768], [4, 8, 16, 32])


@pytest.fixture(autouse=True)
def float64_and_seeded():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def randomise_batchnorms(module: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from 0/1, so a BatchNorm left out or misplaced shows."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return module.eval()


def batch_norm(x: torch.Tensor, layer: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)


def conv_bn_relu_by_definition(block: nn.Sequential, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Conv (no bias, "same" padding), BatchNorm, ReLU: the seed's block."""
    conv, norm = block[0], block[1]
    assert conv.bias is None and conv.kernel_size == (kernel_size, kernel_size)
    return F.relu(batch_norm(F.conv2d(x, conv.weight, padding=kernel_size // 2), norm))


def up2(x: torch.Tensor, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=align_corners)


# --- building blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_unet_conv_bn_relu_and_up_conv(kernel_size: int) -> None:
    block = randomise_batchnorms(unet_module.conv_bn_relu(4, 6, kernel_size))
    x = torch.randn(2, 4, 5, 7)
    torch.testing.assert_close(block(x.clone()), conv_bn_relu_by_definition(block, x, kernel_size))
    up = randomise_batchnorms(unet_module.UpConv(4, 6))
    torch.testing.assert_close(up(x.clone()), conv_bn_relu_by_definition(up.conv, up2(x, False), 3))


def test_unet_sum_block_and_up_block_reach_the_stride_of_the_image() -> None:
    block = randomise_batchnorms(unet_sum_module.conv_bn_relu(4, 6))
    x = torch.randn(1, 4, 5, 7)
    torch.testing.assert_close(block(x.clone()), conv_bn_relu_by_definition(block, x, 3))
    up = randomise_batchnorms(unet_sum_module.UpBlock(4, 6, stride=8))
    image_size = torch.Size((83, 120))  # ceil(83 / 8) = 11, 120 / 8 = 15: not ×2 of the 5 × 7 input
    resized = F.interpolate(x, size=(11, 15), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x.clone(), image_size), conv_bn_relu_by_definition(up.conv, resized, 3))


def test_dpt_residual_unit_is_pre_activation() -> None:
    unit = PreActResidualUnit(3)
    first, second = unit.body[1], unit.body[3]
    assert first.bias is None and second.bias is None
    x = torch.randn(1, 3, 4, 5)
    expected = x + F.conv2d(F.relu(F.conv2d(F.relu(x), first.weight, padding=1)), second.weight, padding=1)
    torch.testing.assert_close(unit(x), expected)


def test_dpt_fusion_block_adds_the_refined_skip_then_resizes_with_aligned_corners() -> None:
    block = FusionBlock(3, has_skip=True)
    x, skip = torch.randn(1, 3, 3, 5), torch.randn(1, 3, 3, 5)
    fused = block.output_unit(x + block.skip_unit(skip))
    resized = F.interpolate(fused, size=(6, 9), mode="bilinear", align_corners=True)
    expected = F.conv2d(resized, block.projection.weight, block.projection.bias)
    torch.testing.assert_close(block(x, skip, torch.Size((6, 9))), expected)
    deepest = FusionBlock(3, has_skip=False)
    assert deepest.skip_unit is None
    doubled = F.interpolate(deepest.output_unit(x), scale_factor=2, mode="bilinear", align_corners=True)
    torch.testing.assert_close(deepest(x), F.conv2d(doubled, deepest.projection.weight, deepest.projection.bias))


# --- whole heads -------------------------------------------------------------------------------------------


def dpt_by_definition(head: nn.Module, features: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """DINOv3's DPT: reassemble, fuse deepest first (each block resized to the next level's size, the last ×2),
    3×3 projection + ReLU, then isl-org's head: 3×3 conv (no bias) → BN → ReLU → Dropout (eval) → 1×1."""
    levels = [reassemble(f) for reassemble, f in zip(head.reassemble, features, strict=True)][::-1]
    x = head.fusion[0](levels[0], size=levels[1].shape[-2:])
    for index in range(1, 4):
        size = levels[index + 1].shape[-2:] if index < 3 else None
        x = head.fusion[index](x, levels[index], size)
    project = head.project[0]
    x = F.relu(F.conv2d(x, project.weight, project.bias, padding=1))
    conv, norm, _, dropout, classify = head.classifier
    assert conv.bias is None and isinstance(dropout, nn.Dropout) and dropout.p == 0.1
    x = F.relu(batch_norm(F.conv2d(x, conv.weight, padding=1), norm))
    logits = F.conv2d(x, classify.weight, classify.bias)
    return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("in_channels", "strides", "size"),
                         [([16] * 4, [16] * 4, (48, 80)), ([8, 16, 32, 64], [4, 8, 16, 32], (72, 104))])  # fmt: skip
def test_dpt_head_on_odd_grids(in_channels: list[int], strides: list[int], size: tuple[int, int]) -> None:
    """ViT taps on a 3 × 5 grid (the stride-32 level is 2 × 3, so ×2 would miss the stride-16 level) and ConvNeXt
    stages at 18 × 26, 9 × 13, 4 × 6, 2 × 3: every fusion must resize to the next level's own size."""
    head = randomise_batchnorms(build_head("dpt", in_channels, strides, 3, features=8, reassemble_channels=[4, 8, 8, 8]))
    features = [torch.randn(1, c, size[0] // s, size[1] // s) for c, s in zip(in_channels, strides)]
    image = torch.randn(1, 3, *size)
    torch.testing.assert_close(head(features, image), dpt_by_definition(head, features, image))


def test_dpt_reassembly_widths_follow_isl_org() -> None:
    def widths(in_channels: list[int], strides: list[int]) -> list[int]:
        return [block[0].out_channels for block in build_head("dpt", in_channels, strides, 1).reassemble]

    assert widths([768] * 4, [16] * 4) == list(DPT_WIDTHS[768]) == [96, 192, 384, 768]
    assert widths([1024] * 4, [16] * 4) == [256, 512, 1024, 1024]
    assert widths([384] * 4, [16] * 4) == [48, 96, 192, 384]  # other widths: D/8, D/4, D/2, D
    assert widths(*CONVNEXT) == CONVNEXT[0]  # stages of growing width keep their own
    assert widths([768] * 4, [4, 8, 16, 32]) == [768] * 4  # equal widths at different strides: not a ViT


@pytest.mark.parametrize("variant", ["paper", "upstream"])
def test_segdino_on_convnext_stages_resizes_each_branch_to_the_first(variant: str) -> None:
    """Stages at strides 4-32: branches 2-4 are resized (half-pixel centres) to the first branch's map."""
    head = build_head("segdino", *CONVNEXT, 2, hidden_channels=4, variant=variant)
    image = torch.randn(1, 3, 64, 96)
    features = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(*CONVNEXT)]

    def branch(index: int) -> torch.Tensor:
        project, refine = head.branches[index]
        assert refine.bias is None
        return F.conv2d(F.conv2d(features[index], project.weight, project.bias), refine.weight, padding=1)

    first = branch(0) if variant == "paper" else F.conv_transpose2d(branch(0), head.first_up.weight, stride=4)
    maps = [first] + [F.interpolate(branch(i), size=first.shape[-2:], mode="bilinear", align_corners=False)
                      for i in (1, 2, 3)]  # fmt: skip
    logits = F.conv2d(torch.cat(maps, dim=1), head.classifier.weight, head.classifier.bias)
    expected = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(features, image), expected)


def test_unet_is_the_seeds_pairwise_fusion() -> None:
    head = randomise_batchnorms(build_head("unet", [32] * 4, [16] * 4, 2))
    features, image = [torch.randn(1, 32, 3, 5) for _ in range(4)], torch.randn(1, 3, 48, 80)
    t1, t2, t3, t4 = features
    x = head.up4(head.up1(t3 + t4) + head.up2(t2))
    x = head.up7(head.up6(x + head.up5(head.up3(t1))))
    expected = head.classifier(torch.cat([x, conv_bn_relu_by_definition(head.image_branch, image, 3)], dim=1))
    torch.testing.assert_close(head(features, image), expected)


def test_unet_with_convnext_stages_resizes_to_stride_16_and_projects_to_the_last_width() -> None:
    head = randomise_batchnorms(build_head("unet", *CONVNEXT, 1))
    assert [type(m) for m in head.adapt] == [nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Identity]
    assert [m.in_channels for m in head.adapt[:3]] == [96, 192, 384] and head.adapt[0].out_channels == 768
    assert head.up1.conv[0].in_channels == 768 and head.up7.conv[0].out_channels == 768 // 16
    # The seed's ViT-B head plus the three 1x1 projections (weights and biases) of this adaptation.
    assert head.trainable_parameters() == 9_502_705 + sum(c * 768 + 768 for c in (96, 192, 384))
    image = torch.randn(1, 3, 64, 96)
    features = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(*CONVNEXT)]
    taps = [adapt(F.interpolate(f, size=(4, 6), mode="bilinear", align_corners=False) if f.shape[-1] != 6 else f)
            for adapt, f in zip(head.adapt, features)]  # fmt: skip
    t1, t2, t3, t4 = taps
    x = head.up7(head.up6(head.up4(head.up1(t3 + t4) + head.up2(t2)) + head.up5(head.up3(t1))))
    expected = head.classifier(torch.cat([x, head.image_branch(image)], dim=1))
    torch.testing.assert_close(head(features, image), expected)


def test_unet_sum_adds_each_projected_tap() -> None:
    head = randomise_batchnorms(build_head("unet_sum", *CONVNEXT, 2, base_channels=16))
    image = torch.randn(1, 3, 64, 96)
    features = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(*CONVNEXT)]
    x = None
    for index in (3, 2, 1, 0):
        for up in head.ups_before_tap[index]:
            x = up(x, image.shape[-2:])
        tap = head.projections[index](batch_norm(features[index], head.norms[index]))
        x = tap if x is None else x + tap
    for up in head.final_ups:
        x = up(x, image.shape[-2:])
    expected = head.classifier(torch.cat([x, head.image_branch(image)], dim=1))
    torch.testing.assert_close(head(features, image), expected)
    assert [len(ups) for ups in head.ups_before_tap] == [1, 1, 1, 0] and len(head.final_ups) == 2
    with pytest.raises(ValueError, match="must not decrease"):
        build_head("unet_sum", [8] * 4, [8, 4, 16, 32], 2)  # only the first pair decreases


def test_unet_adapter_decoder_widths_identities_and_defaults() -> None:
    head = build_head("unet_adapter", [32] * 4, [16] * 4, 2, decoder_channels=[32, 32, 16, 8], conv_channels=16,
                      num_heads=4)  # fmt: skip
    assert [type(p) for p in head.projections] == [nn.Identity, nn.Identity, nn.Sequential]  # skip width == D
    assert head.projections[2][0].kernel_size == (1, 1)
    convnext = build_head("unet_adapter", *CONVNEXT, 2, num_heads=4)
    assert [type(p) for p in convnext.tap_projections] == [nn.Conv2d] * 3 + [nn.Identity]
    assert all(p.kernel_size == (1, 1) and p.out_channels == 768 for p in convnext.tap_projections[:3])
    drop = [m.drop_prob for m in build_head("unet_adapter", [384] * 4, [16] * 4, 2).modules() if hasattr(m, "drop_prob")]
    assert drop and set(drop) == {0.3}  # the seed's DropPath
    from dinov3ds.errors import UserError

    with pytest.raises(UserError, match="4 decoder_channels"):
        build_head("unet_adapter", [32] * 4, [16] * 4, 2, decoder_channels=[32, 16, 8])


def test_unet_adapter_resizes_its_stride_4_logits_with_half_pixel_centres() -> None:
    head = build_head("unet_adapter", [32] * 4, [16] * 4, 2, decoder_channels=[32, 16, 16, 8], conv_channels=16,
                      num_heads=4).eval()  # fmt: skip
    seen = []
    head.classifier.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        logits = head([torch.randn(1, 32, 4, 6) for _ in range(4)], torch.randn(1, 3, 64, 96))
    assert seen[0].shape[-2:] == (16, 24)
    torch.testing.assert_close(logits, F.interpolate(seen[0], size=(64, 96), mode="bilinear", align_corners=False))


# --- every head ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIXEL_HEADS)
def test_a_head_remembers_its_taps_and_classes(name: str) -> None:
    options = {"num_heads": 4} if name in ("unet_adapter", "fapm") else {}
    head = build_head(name, [64] * 4, [16] * 4, 3, **options)
    assert (head.in_channels, head.strides, head.num_classes) == ([64] * 4, [16] * 4, 3)


def test_build_head_gives_a_token_head_its_token_source() -> None:
    tokens = TokenSource(num_heads=2, num_prefix_tokens=1, rotate_half=False, rope=None)
    head = build_head("pmt", [32] * 4, [16] * 4, 3, tokens, num_queries=4, num_blocks=1)
    assert head.tokens is tokens and head.num_queries == 4  # the options reach the head too
    assert (head.in_channels, head.strides, head.num_classes) == ([32] * 4, [16] * 4, 3)
