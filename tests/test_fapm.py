"""The `fapm` head (Dino U-Net) and its pure-PyTorch multi-scale deformable attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.errors import UserError
from dinov3ds.heads.deformable_attention import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)
from dinov3ds.heads.fapm import FAPMHead

SHAPES = [(3, 4), (2, 5)]  # non-square and different per level: catches H/W and level mix-ups



def naive_deformable_attention(value, shapes, locations, weights):
    """Loops over everything; bilinear by hand with pixel centres at (i + 0.5) / size and zeros outside."""
    batch, _, heads, _ = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(levels)]
    rows = []
    for b in range(batch):
        for q in range(queries):
            per_head = []
            for m in range(heads):
                total = value.new_zeros(value.shape[-1])
                for level, (height, width) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, level, p, 0] * width - 0.5
                        y = locations[b, q, m, level, p, 1] * height - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xi < width and 0 <= yi < height:
                                    pixel = value[b, starts[level] + yi * width + xi, m]
                                    total = total + weights[b, q, m, level, p] * wy * wx * pixel
                per_head.append(total)
            rows.append(torch.cat(per_head))
    return torch.stack(rows).view(batch, queries, -1)


def random_inputs(batch, queries, heads, head_dim, points, seed=0):
    """Locations at least 0.1 pixel from any pixel centre line (where bilinear has kinks), some partly
    and some wholly outside the map so the zero padding is exercised."""
    generator = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    size = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, size, heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.empty(batch, queries, heads, levels, points, 2, dtype=torch.float64)
    for level, (height, width) in enumerate(SHAPES):
        for axis, extent in ((0, width), (1, height)):
            whole = torch.randint(-2, extent + 1, locations[..., level, :, axis].shape, generator=generator)
            frac = 0.1 + 0.8 * torch.rand(whole.shape, generator=generator, dtype=torch.float64)
            locations[..., level, :, axis] = (whole + frac + 0.5) / extent
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, torch.tensor(SHAPES), locations, weights


def test_deformable_attention_matches_naive_loops_forward_and_backward():
    value, shapes, locations, weights = random_inputs(batch=2, queries=5, heads=2, head_dim=3, points=3)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    fast = multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2])
    slow = naive_deformable_attention(inputs[0], SHAPES, inputs[1], inputs[2])
    assert fast.shape == (2, 5, 6)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    cotangent = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, inputs, cotangent)
    slow_grads = torch.autograd.grad(slow, inputs, cotangent)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads, strict=True):
        assert slow_grad.abs().sum() > 0
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-5, rtol=0)


def test_deformable_attention_gradcheck():
    value, shapes, locations, weights = random_inputs(
        batch=1, queries=2, heads=2, head_dim=2, points=2, seed=1
    )
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-5
    )


def test_attention_module_offsets_are_pixels_in_x_y_order():
    """One head, one point, no learned offset then a +1 pixel offset along x: each query must read its own
    pixel, then its right neighbour, of a non-square map."""
    torch.manual_seed(0)
    height, width, dim = 3, 5, 4
    attention = MultiScaleDeformableAttention(dim, num_heads=1, num_levels=1, num_points=1).double()
    value = torch.randn(1, height * width, dim, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], -1)[None].double()
    query = torch.randn(1, height * width, dim, dtype=torch.float64)
    projected = attention.value_proj(value)
    with torch.no_grad():
        attention.sampling_offsets.bias.zero_()
    own = attention(query, points, value, [(height, width)])
    # CPU grid_sample is off by ~1e-7 exactly at pixel centres even in float64.
    torch.testing.assert_close(own, attention.output_proj(projected), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        attention.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
    right = attention(query, points, value, [(height, width)])
    grid = projected.view(height, width, dim)
    shifted = torch.cat([grid[:, 1:], torch.zeros_like(grid[:, :1])], dim=1).reshape(1, -1, dim)
    torch.testing.assert_close(right, attention.output_proj(shifted), atol=1e-6, rtol=1e-6)


def unfreeze_query_paths(head):
    """Deformable DETR's init makes offsets and attention weights ignore the query, so the query
    LayerNorm's gradient is exactly zero at step 0; nudge those weights so every path is checked."""
    for module in head.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            for linear in (module.sampling_offsets, module.attention_weights):
                torch.nn.init.normal_(linear.weight, std=0.01)


def vit_features(dim, batch, height, width):
    return [torch.randn(batch, dim, height // 16, width // 16) for _ in range(4)]


@pytest.mark.parametrize("dim", [384, 768])
def test_forward_backward_at_two_sizes_reaches_every_parameter(dim):
    torch.manual_seed(0)
    head = FAPMHead([dim] * 4, [16] * 4, num_classes=3, drop_path=0.0)  # DropPath would drop whole branches
    unfreeze_query_paths(head)
    for height, width in [(64, 64), (64, 96)]:
        head.zero_grad()
        logits = head(vit_features(dim, 2, height, width), torch.randn(2, 3, height, width))
        assert logits.shape == (2, 3, height, width)
        assert torch.isfinite(logits).all()
        logits.square().mean().backward()
        for name, parameter in head.named_parameters():
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            # The released SE squeezes 32 channels to 2 behind a ReLU: both can be off for a batch.
            assert parameter.grad.abs().sum() > 0 or ".gate." in name, name


def test_convnext_like_taps_of_different_widths_and_strides():
    head = FAPMHead([96, 192, 384, 768], [4, 8, 16, 32], num_classes=2)
    features = [
        torch.randn(2, c, 64 // s, 96 // s) for c, s in zip([96, 192, 384, 768], [4, 8, 16, 32], strict=True)
    ]
    assert head(features, torch.randn(2, 3, 64, 96)).shape == (2, 2, 64, 96)


@pytest.mark.parametrize("height, width", [(48, 64), (64, 80), (32, 32)])
def test_bad_input_size_raises_user_error(height, width):
    head = FAPMHead([384] * 4, [16] * 4, num_classes=2)
    with pytest.raises(UserError, match=f"{height}x{width}"):
        head(vit_features(384, 1, height, width), torch.randn(1, 3, height, width))


def test_bad_options_raise_user_error():
    with pytest.raises(UserError, match="4 backbone taps"):
        FAPMHead([384] * 3, [16] * 3, num_classes=2)
    with pytest.raises(UserError, match="num_heads"):
        FAPMHead([384] * 4, [16] * 4, num_classes=2, num_heads=7)


@pytest.mark.parametrize("dim, expected", [(384, 6_194_560), (768, 13_181_632), (1024, 19_969_600)])
def test_trainable_parameters_pinned(dim, expected):
    """Exact counts (2 classes): the released code's 6,194,948 / 13,182,020 / 19,969,988 less the 388 parameters
    of its two unused deep-supervision layers."""
    assert FAPMHead([dim] * 4, [16] * 4, num_classes=2).trainable_parameters() == expected


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    head = FAPMHead([384] * 4, [16] * 4, num_classes=2)
    image = torch.randn(1, 3, 64, 64)
    features = vit_features(384, 1, 64, 64)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    target = (((xs - 20) ** 2 + (ys - 30) ** 2 < 15**2) | (xs > ys + 30)).long()[None]
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    while len(losses) < 60 and (not losses or losses[-1] > 0.5 * losses[0]):
        loss = F.cross_entropy(head(features, image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses
