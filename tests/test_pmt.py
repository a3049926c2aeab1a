"""The `pmt` head (Plain Mask Transformer) and its mask-classification training.

The parameter count is the reference's (tue-mps/pmt builds 53,850,263 for ViT-L, 150 classes); the matcher
and every loss term are checked against Hugging Face transformers' `Mask2FormerLoss` with the same sampled
points; semantic inference against a hand computation. Training through the CLI, against the `linear` head
on the same data for the same number of steps, is in test_cli_segmentation.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinov3ds.config import config_from_dict
from dinov3ds.errors import UserError
from dinov3ds.heads import TokenSource, build_head
from dinov3ds.heads.pmt import annealed_probability, semantic_scores
from dinov3ds.models.tasks import Segmenter, backbone_from_config
from dinov3ds.training.mask_classification import MaskClassificationLoss, semantic_targets

VIT = {"S": (384, 6), "B": (768, 12), "L": (1024, 16)}  # width, attention heads


def tokens_of(size: str) -> TokenSource:
    return TokenSource(num_heads=VIT[size][1], num_prefix_tokens=5, rotate_half=False, rope=None)


@pytest.mark.parametrize(("size", "expected"), [("S", 7_660_183), ("B", 30_360_727), ("L", 53_850_263)])
def test_trainable_parameters_match_the_reference(size: str, expected: int) -> None:
    """150 classes, 100 queries, 6 blocks, MLP as wide as the backbone (every released PMT config)."""
    head = build_head("pmt", [VIT[size][0]] * 4, [16] * 4, 150, tokens_of(size))
    assert head.trainable_parameters() == expected


def test_convnext_taps_are_a_one_line_error() -> None:
    with pytest.raises(UserError, match="ViT backbone"):
        build_head("pmt", [96, 192, 384, 768], [4, 8, 16, 32], 3, None)


def tiny_segmenter(num_classes: int = 3, **options) -> Segmenter:
    config = config_from_dict({
        "task": "segmentation",
        "backbone": {"name": "vits16", "weights": "random", "overrides": {"depth": 2}},
        "data": {"class_names": [f"c{i}" for i in range(num_classes)]},
        "head": {"name": "pmt", "options": {"num_queries": 6, "num_blocks": 3, **options}},
    })  # fmt: skip
    return Segmenter(backbone_from_config(config), num_classes, config, config.data.class_names)


@pytest.mark.parametrize("grid", [(5, 7), (3, 9), (1, 1)])
def test_every_prediction_has_the_references_shape_on_odd_grids(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = tiny_segmenter()
    image = torch.randn(2, 3, grid[0] * 16, grid[1] * 16)
    predictions = model.train()(image)
    assert len(predictions.masks) == len(predictions.classes) == 4  # before each of 3 blocks, and after
    assert all(m.shape == (2, 6, 4 * grid[0], 4 * grid[1]) for m in predictions.masks)
    assert all(c.shape == (2, 6, 4) for c in predictions.classes)  # 3 classes + "no object"
    with torch.no_grad():
        logits = model.eval()(image)
    assert logits.shape == (2, 3, *image.shape[-2:]) and torch.isfinite(logits).all()


def test_annealing_goes_from_one_to_zero_between_the_configured_steps() -> None:
    assert annealed_probability(99, 100, 200, 0.9) == 1.0
    assert annealed_probability(100, 100, 200, 0.9) == 1.0
    assert annealed_probability(150, 100, 200, 0.9) == pytest.approx(0.5**0.9)
    assert annealed_probability(175, 100, 200, 0.9) == pytest.approx(0.25**0.9)
    assert annealed_probability(200, 100, 200, 0.9) == 0.0
    head = tiny_segmenter(annealing_start=[0, 10, 20], annealing_end=[10, 30, 40]).head
    head.set_step(15)
    torch.testing.assert_close(head.mask_probabilities, torch.tensor([0.0, 0.75**0.9, 1.0]))
    with pytest.raises(UserError, match="3 steps each"):
        tiny_segmenter(annealing_start=[0, 10], annealing_end=[10, 30])


def test_attention_mask_follows_the_previous_prediction() -> None:
    """Probability 1: a query sees the patches its mask marks (> 0), and all prefix and query tokens;
    probability 0: it sees everything."""
    head = tiny_segmenter().head
    masks = torch.full((1, 6, 8, 8), -1.0)
    masks[0, 2, :4, :4] = 1.0  # query 2 marks the top-left patch of a 2 x 2 grid
    masks[0, 3] = 0.0  # 0 is not > 0: query 3 marks nothing
    masks[0, 4, :2, :2] = 1.0  # bilinear, not nearest: the top-left patch's centre value is 0 here
    length = 6 + 5 + 4
    allowed = head._attention_mask(masks, (2, 2), length, torch.tensor(1.0))[0, 0]
    assert allowed.dtype == torch.bool  # a float mask would be added to the scores, not mask them
    assert allowed[2, 11:].tolist() == [True, False, False, False]
    assert not allowed[3, 11:].any() and not allowed[4, 11:].any()
    assert not allowed[0, 11:].any() and allowed[:, :11].all() and allowed[6:].all()
    assert head._attention_mask(masks, (2, 2), length, torch.tensor(0.0)).all()


def test_semantic_scores_by_hand() -> None:
    """2 queries, 2 classes: score_k = Σ_q softmax(class_q)[k] · sigmoid(mask_q), "no object" left out."""
    masks = torch.tensor([[0.0, 2.0], [-1.0, 1.0]]).view(1, 2, 1, 2)  # query 0: pixels (0, 2); query 1: (-1, 1)
    classes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]).view(1, 2, 3)

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    def sigmoid(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    p0, p1 = softmax([1.0, 0.0, 0.0]), softmax([0.0, 2.0, 1.0])
    for pixel, (m0, m1) in enumerate([(0.0, -1.0), (2.0, 1.0)]):
        for k in range(2):
            expected = p0[k] * sigmoid(m0) + p1[k] * sigmoid(m1)
            assert semantic_scores(masks, classes)[0, k, 0, pixel].item() == pytest.approx(expected, abs=1e-6)


def crafted_batch(num_classes: int = 4, queries: int = 7):
    torch.manual_seed(0)
    labels = torch.randint(0, num_classes, (3, 24, 20))
    labels[0, :6] = 255  # ignored pixels are in no target mask
    labels[1] = 2  # one class only
    labels[2] = 255  # nothing to match
    masks = torch.randn(3, queries, 12, 10, requires_grad=True)
    classes = torch.randn(3, queries, num_classes + 1, requires_grad=True)
    return labels, masks, classes


def reference_loss(num_classes: int, points: int):
    transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    config = transformers.Mask2FormerConfig(
        num_labels=num_classes, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )  # fmt: skip
    return Mask2FormerLoss(config, weight_dict={})


def test_matching_and_every_loss_term_equal_transformers_mask2former_loss() -> None:
    labels, masks, classes = crafted_batch()
    reference = reference_loss(4, points=64)
    ours = MaskClassificationLoss(4, 255, num_points=64)
    targets = semantic_targets(labels, 4, 255)
    assert [ids.tolist() for ids, _ in targets][1:] == [[2], []]
    mask_labels, class_labels = [m for _, m in targets], [ids for ids, _ in targets]

    torch.manual_seed(7)  # both draw the matcher's points, then the loss's, in the same order
    indices = reference.matcher(masks, classes, mask_labels, class_labels)
    matched = sum(len(rows) for rows, _ in indices)
    expected = {**reference.loss_masks(masks, mask_labels, indices, matched),
                **reference.loss_labels(classes, class_labels, indices)}  # fmt: skip
    torch.manual_seed(7)
    assert [(r.tolist(), c.tolist()) for r, c in ours.match(masks, classes, targets)] == [
        (r.tolist(), c.tolist()) for r, c in indices
    ]
    torch.manual_seed(7)
    terms = ours.terms(masks, classes, targets)
    for name, key in (("class", "loss_cross_entropy"), ("mask", "loss_mask"), ("dice", "loss_dice")):
        torch.testing.assert_close(terms[name], expected[key], rtol=0, atol=1e-5)


def test_total_loss_sums_every_prediction_with_the_weights_and_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = tiny_segmenter().train()
    labels = torch.randint(0, 3, (2, 32, 48))
    predictions = model(torch.randn(2, 3, 32, 48))
    criterion = MaskClassificationLoss(3, 255, num_points=32)
    torch.manual_seed(3)
    total = criterion(predictions, labels)
    torch.manual_seed(3)
    targets = semantic_targets(labels, 3, 255)
    expected = 0.0
    for masks, classes in zip(predictions.masks, predictions.classes):
        terms = criterion.terms(masks, classes, targets)
        expected = expected + 2 * terms["class"] + 5 * terms["mask"] + 5 * terms["dice"]
    torch.testing.assert_close(total, expected)
    total.backward()
    missing = [n for n, p in model.head.named_parameters() if p.grad is None]
    assert not missing


def test_state_dict_round_trip_keeps_the_annealing_state(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_segmenter(annealing_start=[0, 0, 0], annealing_end=[5, 5, 5])
    image = torch.randn(1, 3, 48, 32)
    model.train()(image)  # BatchNorm statistics move
    model.head.set_step(2)
    torch.save(model.head.state_dict(), tmp_path / "head.pt")
    restored = tiny_segmenter(annealing_start=[0, 0, 0], annealing_end=[5, 5, 5])
    restored.head.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    torch.testing.assert_close(restored.head.mask_probabilities, model.head.mask_probabilities)
    torch.manual_seed(1)
    with torch.no_grad():
        expected = model.eval()(image)
    torch.manual_seed(1)  # the masks are still partly on at step 2: their random part repeats with the seed
    with torch.no_grad():
        assert torch.equal(restored.eval()(image), expected)


def test_onnx_export_of_an_annealed_head_matches_pytorch(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra")
    from dinov3ds.deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    model = tiny_segmenter(annealing_start=[0, 0, 0], annealing_end=[1, 1, 1])
    model.head.set_step(1)  # training finished: plain attention, no random masks
    assert max(check.logits for check in export_onnx(model.eval(), tmp_path / "pmt.onnx", 48, 64).parity) < 1e-4


def test_semantic_targets_by_hand() -> None:
    """One mask per class present, in increasing order; the ignore index and ids outside the classes make none."""
    labels = torch.tensor([[[2, 0, 255], [3, 2, 0]]])  # 3 = num_classes: outside the classes
    [(ids, masks)] = semantic_targets(labels, 3, 255)
    assert ids.tolist() == [0, 2]
    assert masks.tolist() == [[[0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 0]]]
    [(ids, masks)] = semantic_targets(torch.tensor([[[1, 1], [1, 1]]]), 3, 1)  # an ignore index inside the range
    assert ids.tolist() == [] and masks.shape == (0, 2, 2)


def test_pairwise_costs_by_brute_force() -> None:
    """Every (query, target) pair: mean BCE over the points, and 1 - (2·Σpt + 1) / (Σp + Σt + 1)."""
    from dinov3ds.training.mask_classification import pairwise_costs

    torch.manual_seed(0)
    logits, targets = torch.randn(3, 5, dtype=torch.float64), (torch.rand(2, 5) > 0.5).double()
    bce, dice = pairwise_costs(logits, targets)
    for q in range(3):
        for t in range(2):
            p = torch.sigmoid(logits[q])
            expected_bce = -(targets[t] * p.log() + (1 - targets[t]) * (1 - p).log()).mean()
            expected_dice = 1 - (2 * (p * targets[t]).sum() + 1) / (p.sum() + targets[t].sum() + 1)
            torch.testing.assert_close(bce[q, t], expected_bce)
            torch.testing.assert_close(dice[q, t], expected_dice)


def test_uncertain_points_take_the_smallest_logits_then_random_ones() -> None:
    from dinov3ds.training.mask_classification import point_values, uncertain_points

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 6)
    torch.manual_seed(1)
    points = uncertain_points(logits, 8, 3.0, 0.75)
    torch.manual_seed(1)
    candidates = torch.rand(2, 24, 2)
    assert points.shape == (2, 8, 2)
    for mask in range(2):
        scores = point_values(logits, candidates)[mask].abs()
        expected = candidates[mask][scores.argsort()[:6]]  # the 6 most uncertain of 24, most uncertain first
        torch.testing.assert_close(points[mask, :6], expected)
    assert not any((points[:, 6:, None] == candidates[:, None]).all(-1).any(-1).flatten())  # 2 fresh random ones


def test_normaliser_counts_matched_masks_at_least_one_averaged_over_processes() -> None:
    import torch.distributed as dist

    loss = MaskClassificationLoss(3, 255)
    assert [loss._normaliser(n, torch.device("cpu")).item() for n in (0, 1, 3)] == [1.0, 1.0, 3.0]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29871", rank=0, world_size=1)
    try:  # under DDP the count is summed over the processes and divided by their number
        assert loss._normaliser(3, torch.device("cpu")).item() == 3.0
    finally:
        dist.destroy_process_group()


def test_pixels_of_the_ignore_index_make_no_target_even_inside_the_class_range() -> None:
    """ignore_index 1 with 3 classes: a label map of only 1 has nothing to match, like one of only 255."""
    torch.manual_seed(0)
    predictions = tiny_segmenter().train()(torch.randn(1, 3, 32, 32))
    ones, ignored = torch.ones(1, 32, 32, dtype=torch.long), torch.full((1, 32, 32), 255)
    torch.manual_seed(1)
    inside = MaskClassificationLoss(3, 1, num_points=16)(predictions, ones)
    torch.manual_seed(1)
    outside = MaskClassificationLoss(3, 255, num_points=16)(predictions, ignored)
    torch.testing.assert_close(inside, outside)


def test_layers_are_the_references() -> None:
    """Block settings that change no parameter count: RoPE layout of the backbone, LayerNorm eps 1e-5, layer
    scale starting at 1, GELUs in the mask MLP and projections, two x2 up-sampling blocks for patch 16."""
    model = tiny_segmenter()
    head, backbone_attention = model.head, model.backbone.model.blocks[0].attn
    for block in head.blocks:
        assert block.attn.rotate_half == backbone_attention.rotate_half and block.attn.num_heads == 6
        assert block.norm1.eps == block.norm2.eps == 1e-5
        assert torch.equal(block.gamma_1, torch.ones(384)) and torch.equal(block.gamma_2, torch.ones(384))
    assert [type(m).__name__ for m in head.mask_mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [type(m).__name__ for m in head.projections[0]] == ["Linear", "GELU", "Linear"]
    assert len(head.upscale) == 2 and head.upscale[0].depthwise.groups == 384


def test_option_checks() -> None:
    tiny_segmenter(num_queries=1, num_blocks=1)  # the smallest head is fine
    tiny_segmenter(annealing_start=[5, 5, 5], annealing_end=[5, 5, 5])  # switched off at once: allowed
    for options, message in (({"num_queries": 0}, "num_queries=0"), ({"num_blocks": 0}, "num_blocks=0"),
                             ({"annealing_start": [0, 0, 0]}, "together"),
                             ({"annealing_start": [0, 5, 0], "annealing_end": [1, 4, 1]}, "start <= end"),
                             ({"annealing_start": [0, 0, 0], "annealing_end": [1, 1]}, "3 steps each")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            tiny_segmenter(**options)
    with pytest.raises(UserError, match="one width and stride"):
        build_head("pmt", [384, 384, 384, 192], [16] * 4, 3, tokens_of("S"))
    head = tiny_segmenter().head
    head.set_step(10**6)  # no annealing configured: masked attention stays on
    assert torch.equal(head.mask_probabilities, torch.ones(3))


def test_taps_enter_the_blocks_as_the_reference_sums_them() -> None:
    """Input of the first block: queries, then Σ over taps of (BN(t) + MLP(BN(t))) · scale, by hand."""
    torch.manual_seed(0)
    model = tiny_segmenter().eval()
    head = model.head
    with torch.no_grad():
        for scale in head.scales:
            scale.uniform_(0.5, 2.0)
        for norm in head.tap_norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    image = torch.randn(1, 3, 32, 48)
    tokens = model.features(image)
    seen = []
    head.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True)
    with torch.no_grad():
        head(tokens, image)
        summed = 0
        for t, norm, projection, scale in zip(tokens, head.tap_norms, head.projections, head.scales):
            normed = (t - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            hidden = torch.nn.functional.gelu(normed @ projection[0].weight.T + projection[0].bias)
            summed = summed + (normed + hidden @ projection[2].weight.T + projection[2].bias) * scale
    expected = torch.cat([head.queries.weight[None], summed], dim=1)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_masks_come_from_the_patch_tokens_in_grid_order() -> None:
    """_predict: the patch tokens (after the queries and prefix tokens) laid out row by row on the grid."""
    torch.manual_seed(0)
    head = tiny_segmenter().head.eval()
    x = torch.randn(1, 6 + 5 + 6, 384)  # 6 queries, 5 prefix tokens, a 2 x 3 grid
    with torch.no_grad():
        masks, classes = head._predict(x, (2, 3))
        normed = head.norm(x)
        grid = normed[0, 11:].reshape(2, 3, 384).permute(2, 0, 1)[None]
        expected = torch.einsum("qc,chw->qhw", head.mask_mlp(normed[0, :6]), head.upscale(grid)[0])
    torch.testing.assert_close(masks[0], expected)
    torch.testing.assert_close(classes[0], head.classifier(normed[0, :6]))


def test_rope_and_masked_attention_change_what_the_blocks_compute() -> None:
    """The backbone's RoPE reaches the blocks (no RoPE gives another output), masked attention with
    probability 1 differs from plain attention, and with masked_attention off the probability is ignored."""
    torch.manual_seed(0)
    model = tiny_segmenter().eval()
    image = torch.randn(1, 3, 32, 48)
    tokens = model.features(image)
    head = model.head

    def output(probability: float, rope: bool = True, head=head) -> torch.Tensor:
        head.mask_probabilities.fill_(probability)
        saved = head.tokens
        if not rope:
            head.tokens = TokenSource(saved.num_heads, saved.num_prefix_tokens, saved.rotate_half, None)
        with torch.no_grad():
            result = head(tokens, image)
        head.tokens = saved
        return result

    plain = output(0.0)
    assert not torch.allclose(output(0.0, rope=False), plain)
    assert not torch.allclose(output(1.0), plain)
    torch.manual_seed(0)
    unmasked = tiny_segmenter(masked_attention=False).eval()
    unmasked.head.load_state_dict(head.state_dict())
    assert torch.equal(output(1.0, head=unmasked.head), output(0.0, head=unmasked.head))


def test_semantic_logits_upsample_the_masks_first() -> None:
    from dinov3ds.heads.pmt import semantic_logits

    torch.manual_seed(0)
    masks, classes = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4)
    upsampled = torch.nn.functional.interpolate(masks, size=(16, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(semantic_logits(masks, classes, (16, 20)).exp(), semantic_scores(upsampled, classes))


def test_each_image_draws_its_own_queries_to_unmask() -> None:
    torch.manual_seed(0)
    head = tiny_segmenter(num_queries=6).head
    masks = torch.full((2, 6, 8, 8), -1.0)
    allowed = head._attention_mask(masks, (2, 2), 6 + 5 + 4, torch.tensor(0.5))
    seeing = allowed[:, 0, :6, 11:].all(-1)  # queries that see every patch: the ones drawn to be unmasked
    assert seeing.any() and not torch.equal(seeing[0], seeing[1])
