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


# --- values of the adapter's pieces, float64, against their definitions ------------------------------------


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """float64, every parameter drawn at random (Deformable DETR's init zeroes the query paths), eval mode."""
    module = module.double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_var.uniform_(0.5, 2)
                layer.running_mean.uniform_(-1, 1)
    return module


def test_attention_module_equals_its_definition_over_two_levels():
    """Value projection, offsets in pixels of each level ((x, y) / (W, H)), softmax over levels x points, the
    sampling by the naive loops above, output projection."""
    attention = randomised(MultiScaleDeformableAttention(8, num_heads=2, num_levels=2, num_points=2, value_ratio=0.5))
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 3, 8, generator=generator, dtype=torch.float64)
    points = torch.rand(1, 3, 2, generator=generator, dtype=torch.float64)
    value = torch.randn(1, sum(h * w for h, w in SHAPES), 8, generator=generator, dtype=torch.float64)
    projected = F.linear(value, attention.value_proj.weight, attention.value_proj.bias).view(1, -1, 2, 2)
    offsets = F.linear(query, attention.sampling_offsets.weight, attention.sampling_offsets.bias).view(1, 3, 2, 2, 2, 2)
    logits = F.linear(query, attention.attention_weights.weight, attention.attention_weights.bias).view(1, 3, 2, 4)
    weights = logits.softmax(-1).view(1, 3, 2, 2, 2)
    sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)  # (W, H) per level
    locations = points[:, :, None, None, None, :] + offsets / sizes[:, None, :]
    sampled = naive_deformable_attention(projected, SHAPES, locations, weights)
    expected = F.linear(sampled, attention.output_proj.weight, attention.output_proj.bias)
    torch.testing.assert_close(attention(query, points, value, SHAPES), expected, atol=1e-6, rtol=1e-6)


def test_sampling_offsets_start_in_each_heads_direction():
    """Deformable DETR's start: head m looks along angle 2πm/H, the direction scaled so its larger
    coordinate is 1, point p at distance p + 1, on every level; the query paths are zero."""
    heads, levels, points = 8, 2, 3
    attention = MultiScaleDeformableAttention(16, num_heads=heads, num_levels=levels, num_points=points)
    bias = attention.sampling_offsets.bias.view(heads, levels, points, 2)
    for m in range(heads):
        angle = 2 * math.pi * m / heads
        largest = max(abs(math.cos(angle)), abs(math.sin(angle)))
        for level in range(levels):
            for p in range(points):
                expected = [math.cos(angle) / largest * (p + 1), math.sin(angle) / largest * (p + 1)]
                torch.testing.assert_close(bias[m, level, p], torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert attention.sampling_offsets.weight.abs().sum() == 0
    assert attention.attention_weights.weight.abs().sum() == 0 and attention.attention_weights.bias.abs().sum() == 0


def test_reference_points_are_pixel_centres_in_x_y_order():
    from dinov3ds.heads.vit_adapter import reference_points

    points = reference_points([(2, 3), (1, 2)], torch.zeros(1, dtype=torch.float64))
    expected = [((j + 0.5) / 3, (i + 0.5) / 2) for i in range(2) for j in range(3)] + [(0.25, 0.5), (0.75, 0.5)]
    assert points.dtype == torch.float64 and points.shape == (1, 8, 2)
    torch.testing.assert_close(points[0], torch.tensor(expected, dtype=torch.float64))


def conv_ffn_by_definition(ffn, tokens, shapes):
    x = F.linear(tokens, ffn.fc1.weight, ffn.fc1.bias)
    parts, start = [], 0
    for height, width in shapes:
        grid = x[:, start : start + height * width].transpose(1, 2).reshape(x.shape[0], -1, height, width)
        parts.append(F.conv2d(grid, ffn.depthwise.weight, ffn.depthwise.bias, padding=1, groups=grid.shape[1])
                     .flatten(2).transpose(1, 2))  # fmt: skip
        start += height * width
    return F.linear(F.gelu(torch.cat(parts, dim=1)), ffn.fc2.weight, ffn.fc2.bias)


def test_extractor_is_two_pre_norm_residuals():
    from timm.layers import DropPath

    from dinov3ds.heads.vit_adapter import Extractor, reference_points

    extractor = randomised(Extractor(8, num_heads=2, num_points=2, value_ratio=0.5, ffn_ratio=0.5, drop_path=0.0))
    assert [n.eps for n in (extractor.query_norm, extractor.feature_norm, extractor.ffn_norm)] == [1e-6] * 3
    shapes = [(2, 3), (1, 2)]
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 8, 8, generator=generator, dtype=torch.float64)
    feature = torch.randn(1, 8, 2, 2, generator=generator, dtype=torch.float64)
    points = reference_points(shapes, query)

    def norm(layer, x):
        return F.layer_norm(x, (8,), layer.weight, layer.bias, 1e-6)

    tokens = norm(extractor.feature_norm, feature.flatten(2).transpose(1, 2))
    attended = query + extractor.attention(norm(extractor.query_norm, query), points, tokens, [(2, 2)])
    expected = attended + conv_ffn_by_definition(extractor.ffn, norm(extractor.ffn_norm, attended), shapes)
    torch.testing.assert_close(extractor(query, points, feature, shapes), expected)
    assert isinstance(Extractor(8, 2, 2, 0.5, 0.5, drop_path=0.3).drop_path, DropPath)
    assert Extractor(8, 2, 2, 0.5, 0.5, drop_path=0.3).drop_path.drop_prob == 0.3
    assert isinstance(Extractor(8, 2, 2, 0.5, 0.5, drop_path=0.0).drop_path, torch.nn.Identity)


def test_adapter_reads_each_tap_once_then_the_last_again_and_adds_the_taps():
    from dinov3ds.heads.vit_adapter import Adapter, reference_points

    adapter = randomised(Adapter(8, 4, num_heads=2, num_points=2, value_ratio=0.5, ffn_ratio=0.5, drop_path=0.0,
                                 extra_extractors=2))  # fmt: skip
    pool = adapter.spatial_prior.stem[-1]
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)  # ViT-Adapter's stem
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 64, 96, generator=generator, dtype=torch.float64)
    taps = [torch.randn(1, 8, 4, 6, generator=generator, dtype=torch.float64) for _ in range(4)]
    read = []
    for extractor in adapter.extractors:
        extractor.register_forward_hook(lambda module, inputs, output: read.append(inputs[2]))
    found = adapter(taps, image)
    assert [next(i for i, tap in enumerate(taps) if tap is seen) for seen in read] == [0, 1, 2, 3, 3, 3]
    c1, c2, c3, c4 = adapter.spatial_prior(image)
    coarse = [c2, c3, c4]
    query = torch.cat([(c + e[:, None, None]).flatten(2).transpose(1, 2) for c, e in zip(coarse, adapter.level_embed)], 1)
    shapes = [tuple(c.shape[-2:]) for c in coarse]
    points = reference_points(shapes, query)
    for index, extractor in enumerate(adapter.extractors):
        query = extractor(query, points, taps[min(index, 3)], shapes)
    sizes = [h * w for h, w in shapes]
    c2, c3, c4 = (q.transpose(1, 2).reshape(1, 8, h, w) for q, (h, w) in zip(query.split(sizes, 1), shapes))
    maps = [F.conv_transpose2d(c2, adapter.up.weight, adapter.up.bias, stride=2) + c1, c2, c3, c4]
    for i, (m, tap) in enumerate(zip(maps, taps)):
        summed = m + F.interpolate(tap, size=m.shape[-2:], mode="bilinear", align_corners=False)
        norm = adapter.norms[i]
        expected = F.batch_norm(summed, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0, norm.eps)
        torch.testing.assert_close(found[i], expected)


def test_fapm_projection_squeeze_excitation_and_upsampling_by_definition():
    from dinov3ds.heads.fapm import FidelityAwareProjection, LearnableUpsample, SqueezeExcitation

    se = randomised(SqueezeExcitation(32))
    assert se.gate[1].out_channels == 2 and SqueezeExcitation(16).gate[1].out_channels == 1  # reduction 16, at least 1
    x = torch.randn(1, 32, 3, 5, dtype=torch.float64)
    hidden = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), se.gate[1].weight, se.gate[1].bias))
    gate = torch.sigmoid(F.conv2d(hidden, se.gate[3].weight, se.gate[3].bias))
    torch.testing.assert_close(se(x), x * gate)

    fapm = randomised(FidelityAwareProjection(8, 6, (6, 4)))
    assert isinstance(fapm.shortcut[0], torch.nn.Identity) and isinstance(fapm.shortcut[1], torch.nn.Conv2d)
    maps = [torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 8, 2, 2, dtype=torch.float64)]
    for i, (out, x) in enumerate(zip(fapm(maps), maps)):
        gamma, beta = fapm.film[i](fapm.shared(x)).chunk(2, dim=1)
        z = gamma * fapm.specific[i](x) + beta
        torch.testing.assert_close(out, fapm.refine[i](z) + fapm.shortcut[i](z))
    slopes = {m.negative_slope for m in FAPMHead([64] * 4, [16] * 4, 2, num_heads=4).modules()
              if isinstance(m, torch.nn.LeakyReLU)}  # fmt: skip
    assert slopes == {0.01}  # nnU-Net's

    up = randomised(LearnableUpsample(2))
    x = torch.randn(1, 2, 2, 8, dtype=torch.float64)

    def up2(t):
        return F.conv_transpose2d(t, up.up2.weight, up.up2.bias, stride=2)

    torch.testing.assert_close(up(x, (8, 32)), up2(up2(x)))  # exact ×4 on both sides
    # ×2 fits the width only once: one transposed conv, then bilinear to the size (both sides must fit).
    torch.testing.assert_close(up(x, (8, 16)), F.interpolate(up2(x), size=(8, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(up(x, (9, 33)), F.interpolate(up2(up2(x)), size=(9, 33), mode="bilinear", align_corners=False))
    square = torch.randn(1, 2, 2, 2, dtype=torch.float64)  # the height allows one ×2, the width three
    torch.testing.assert_close(up(square, (4, 16)), F.interpolate(up2(square), size=(4, 16), mode="bilinear",
                                                                  align_corners=False))  # fmt: skip


def test_fapm_options_sizes_and_convnext_projections():
    with pytest.raises(UserError, match="colour"):
        FAPMHead([64] * 4, [16] * 4, 2, colour="red")  # forwarded to the base class, which refuses it
    with pytest.raises(UserError, match="num_heads 64 does not divide the value width 32"):
        FAPMHead([64] * 4, [16] * 4, 2, num_heads=64)
    convnext = FAPMHead([96, 192, 384, 768], [4, 8, 16, 32], 2)
    assert [type(p) for p in convnext.tap_projections] == [torch.nn.Conv2d] * 3 + [torch.nn.Identity]
    assert all(p.kernel_size == (1, 1) and p.out_channels == 768 for p in convnext.tap_projections[:3])
    head = FAPMHead([32] * 4, [16] * 4, 2, adapter_dim=16, conv_channels=4, rank=8, out_channels=(4, 4, 8, 8),
                    num_heads=2, drop_path=0.0).eval()  # fmt: skip
    with torch.no_grad():  # 32 x 64 is the smallest input allowed: two stride-32 cells
        assert head(vit_features(32, 1, 32, 64), torch.randn(1, 3, 32, 64)).shape == (1, 2, 32, 64)
