"""Losses against torch's own functions and against their defining properties."""

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.errors import UserError
from dinov3ds.training.losses import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    build_loss,
    logits_to_labels,
    logits_to_probabilities,
)

IGNORE = 255


def make_batch(num_classes=4, seed=0, shape=(2, 6, 5)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], num_classes, *shape[1:], generator=generator)
    target = torch.randint(0, max(num_classes, 2), shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = IGNORE
    return logits, target


def confident_logits(target, num_classes, correct=True):
    """Logits of ±30 on the true class (or on the next class when `correct` is False)."""
    labels = torch.where(target == IGNORE, 0, target)
    if not correct:
        labels = (labels + 1) % num_classes
    return 60 * F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() - 30


@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0, 3.0]])
def test_ce_equals_torch(class_weights):
    logits, target = make_batch()
    loss = build_loss("ce", num_classes=4, class_weights=class_weights)(logits, target)
    weight = None if class_weights is None else torch.tensor(class_weights)
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected)


def test_binary_ce_equals_torch():
    logits, target = make_batch(num_classes=1)
    loss = build_loss("ce", num_classes=1)(logits, target)
    valid = target != IGNORE
    expected = F.binary_cross_entropy_with_logits(logits[:, 0][valid], target[valid].float())
    torch.testing.assert_close(loss, expected)


def test_combined_is_weighted_sum():
    logits, target = make_batch()
    ce = build_loss("ce", num_classes=4)(logits, target)
    dice = build_loss("dice", num_classes=4)(logits, target)
    both = build_loss("ce+dice", num_classes=4, weights={"ce": 0.3, "dice": 2.0})(logits, target)
    torch.testing.assert_close(both, 0.3 * ce + 2.0 * dice)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_dice_perfect_and_wrong(num_classes):
    _, target = make_batch(num_classes, shape=(2, 16, 16))
    dice = build_loss("dice", num_classes=num_classes)
    channels = max(num_classes, 2)
    perfect = confident_logits(target, channels)
    wrong = confident_logits(target, channels, correct=False)
    if num_classes == 1:  # one channel: foreground logit minus background logit
        perfect, wrong = perfect[:, 1:] - perfect[:, :1], wrong[:, 1:] - wrong[:, :1]
    assert dice(perfect, target).item() == pytest.approx(0, abs=1e-4)
    assert dice(wrong, target).item() == pytest.approx(1, abs=1e-2)


def test_dice_matches_direct_formula():
    logits, target = make_batch(num_classes=4, seed=5)
    target[target == 3] = 0  # class 3 is absent from the labels and must be left out of the mean
    loss = build_loss("dice", num_classes=4)(logits, target)
    probabilities = logits.softmax(1)
    scores = []
    for c in range(4):
        valid = target != IGNORE
        p, t = probabilities[:, c][valid], (target[valid] == c).float()
        if t.sum() > 0:
            scores.append((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    torch.testing.assert_close(loss, 1 - torch.stack(scores).mean())


@pytest.mark.parametrize("name", ["ce", "dice", "ce+dice", "focal", "lovasz", "focal+dice"])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_ignored_pixels_do_not_count(name, num_classes):
    logits, target = make_batch(num_classes, seed=1)
    criterion = build_loss(name, num_classes=num_classes)
    changed = logits.clone()
    changed[(target == IGNORE).unsqueeze(1).expand_as(logits)] = 1000.0
    torch.testing.assert_close(criterion(changed, target), criterion(logits, target))
    all_ignored = torch.full_like(target, IGNORE)
    assert criterion(logits, all_ignored).item() == 0


@pytest.mark.parametrize("name", ["ce", "dice", "ce+dice", "focal", "lovasz", "focal+dice"])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_gradients_reduce_loss(name, num_classes):
    logits, target = make_batch(num_classes, seed=2)
    logits.requires_grad_(True)
    criterion = build_loss(name, num_classes=num_classes)
    # Dice spreads its gradient over all pixels of a class, so it needs a larger step than per-pixel CE.
    optimizer = torch.optim.SGD([logits], lr=50.0 if name in ("dice", "lovasz") else 5.0)
    first = criterion(logits, target).item()
    for _ in range(20):
        optimizer.zero_grad()
        criterion(logits, target).backward()
        optimizer.step()
    assert criterion(logits, target).item() < 0.8 * first


def test_logits_to_labels_and_probabilities():
    logits, _ = make_batch(num_classes=3)
    assert torch.equal(logits_to_labels(logits), logits.argmax(1))
    torch.testing.assert_close(logits_to_probabilities(logits).sum(1), torch.ones(2, 6, 5))
    single = torch.tensor([[[[-1.0, 0.5]]]])
    assert logits_to_labels(single).tolist() == [[[0, 1]]]
    probabilities = logits_to_probabilities(single)
    assert probabilities.shape == (1, 2, 1, 2)
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(single[:, 0]))
    assert torch.equal(logits_to_labels(single), probabilities.argmax(1))


def test_bad_names_and_weights():
    with pytest.raises(UserError, match=r"unknown loss 'ce\+tversky'; join terms from ce, dice, focal, lovasz"):
        build_loss("ce+tversky", num_classes=3)
    with pytest.raises(UserError, match="class_weights"):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0])


def test_dice_in_bf16_is_computed_in_float32():
    """bf16 training: sums over 2^18 pixels in bf16 keep 8 bits of mantissa and drift far from the true Dice."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 512, 512, generator=generator)
    target = torch.randint(0, 3, (1, 512, 512), generator=generator)
    loss = build_loss("dice", num_classes=3)
    expected = loss(logits, target)
    result = loss(logits.bfloat16(), target)
    assert result.dtype == torch.float32
    # Only the bf16 rounding of the logits themselves remains (about 4e-3 relative per value, averaged out).
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-3)


def test_shape_errors_name_both_shapes():
    loss = build_loss("ce+dice", num_classes=3)
    for logits, target in [(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long)),
                           (torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))]:  # fmt: skip
        with pytest.raises(ValueError, match=r"logits \[B,K,H,W\] and target \[B,H,W\], got torch.Size"):
            loss(logits, target)


def test_binary_tasks_take_two_class_weights():
    """A binary task has two classes whether the head has one channel (sigmoid) or two (softmax)."""
    for num_classes in (1, 2):
        assert build_loss("ce", num_classes=num_classes, class_weights=[1.0, 3.0]) is not None
        with pytest.raises(UserError, match="class_weights has 3 entries but there are 2 classes"):
            build_loss("ce", num_classes=num_classes, class_weights=[1.0, 2.0, 3.0])


def test_terms_are_named_for_logging_and_weights_are_not_saved():
    loss = build_loss("ce+dice", num_classes=2, class_weights=[1.0, 2.0])
    assert list(loss.terms) == ["ce", "dice"]
    assert loss.state_dict() == {}  # class weights come from the config, never from a checkpoint


def test_default_ignore_index_is_255():
    logits, target = make_batch(num_classes=3)
    kept = target != IGNORE
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    # Dice: the logits of pixels labelled 255 change nothing.
    dice = DiceLoss()
    moved = torch.where(kept.unsqueeze(1), logits, logits + 5 * torch.arange(3.0).view(1, 3, 1, 1))
    torch.testing.assert_close(dice(moved, target), dice(logits, target))


def test_one_channel_labels_and_probabilities_at_any_height():
    logits = torch.tensor([[[[-1.0, 0.0], [2.0, -0.5], [0.25, -3.0]]]])  # [1, 1, 3, 2]
    assert logits_to_labels(logits).tolist() == [[[0, 0], [1, 0], [1, 0]]]  # p = 0.5 is not foreground
    assert logits_to_probabilities(logits).shape == (1, 2, 3, 2)
    wide = torch.randn(2, 3, 1, 4)  # one row, three classes: still a softmax over the class axis
    assert torch.equal(logits_to_labels(wide), wide.argmax(1))
    torch.testing.assert_close(logits_to_probabilities(wide), wide.softmax(1))


def test_dice_by_hand_for_one_channel_and_a_one_pixel_class():
    # One channel: p = sigmoid(logit) against the 0/1 target; smooth 1.
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]]])
    target = torch.tensor([[[1, 1], [0, 0]]])
    p = torch.sigmoid(logits)[0, 0]
    intersection = p[0, 0] + p[0, 1]
    expected = 1 - (2 * intersection + 1) / (p.sum() + 2 + 1)
    torch.testing.assert_close(build_loss("dice", num_classes=1)(logits, target), expected)
    # Three classes, class 2 on exactly one pixel: it is present and counts in the mean.
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[[0, 0], [1, 2]]])
    probabilities = logits.softmax(1)[0]
    one_hot = F.one_hot(target[0], 3).permute(2, 0, 1).float()
    dice = (2 * (probabilities * one_hot).sum((1, 2)) + 1) / (probabilities.sum((1, 2)) + one_hot.sum((1, 2)) + 1)
    torch.testing.assert_close(build_loss("dice", num_classes=3)(logits, target), 1 - dice.mean())


def test_one_channel_dice_on_an_empty_target_still_penalises_foreground():
    """Binary Dice with no foreground in the batch: 1 - smooth / (Σp + smooth), not the multi-class
    "no class present" zero, so predicted foreground is still pushed down."""
    logits = torch.tensor([[[[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]]]])  # [1, 1, 2, 3]
    target = torch.zeros(1, 2, 3, dtype=torch.long)
    expected = 1 - 1 / (torch.sigmoid(logits).sum() + 1)
    torch.testing.assert_close(build_loss("dice", num_classes=1)(logits, target), expected)


def test_focal_loss_by_hand_and_over_valid_pixels_only():
    logits = torch.tensor([[[[2.0, 0.5]], [[0.0, 0.5]], [[-1.0, 3.0]]]])  # [1, 3, 1, 2]
    target = torch.tensor([[[0, IGNORE]]])
    p = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)[0]
    expected = (1 - p) ** 2 * -torch.log(p)  # one valid pixel: the mean is that pixel's value
    torch.testing.assert_close(build_loss("focal", num_classes=3)(logits, target), expected)
    gamma0 = build_loss("focal", num_classes=3, focal_gamma=0.0)(logits, target)
    torch.testing.assert_close(gamma0, F.cross_entropy(logits, target, ignore_index=IGNORE))  # gamma 0 is CE


def lovasz_by_definition(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Lovász extension of the set function f(A) = 1 - |G \\ A| / |G ∪ A| (the Jaccard loss when the
    pixels in A are wrong), evaluated at the errors |g - p|, from its definition; mean over present classes."""
    losses = []
    for cls in range(probabilities.shape[1]):
        truth = labels == cls
        if not truth.any():
            continue
        errors = (truth.float() - probabilities[:, cls]).abs()
        order = sorted(range(len(errors)), key=lambda i: -float(errors[i]))

        ground = {i for i in range(len(truth)) if truth[i]}

        def jaccard_loss(wrong: set, ground: set = ground) -> float:
            return 1 - len(ground - wrong) / len(ground | wrong)

        total, wrong = 0.0, set()
        for index in order:
            before = jaccard_loss(wrong)
            wrong.add(index)
            total += float(errors[index]) * (jaccard_loss(wrong) - before)
        losses.append(total)
    return torch.tensor(sum(losses) / len(losses))


def test_lovasz_softmax_equals_its_definition():
    logits = torch.randn(1, 3, 2, 4, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([[[0, 0, 1, 1], [1, 0, IGNORE, 0]]])  # class 2 absent: left out of the mean
    probabilities = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 3)
    keep = target.reshape(-1) != IGNORE
    expected = lovasz_by_definition(probabilities[keep], target.reshape(-1)[keep])
    torch.testing.assert_close(build_loss("lovasz", num_classes=3)(logits, target), expected.float(), rtol=1e-5, atol=1e-6)


def test_the_seeds_mri_recipe_is_ten_focal_plus_three_dice():
    logits, target = make_batch(num_classes=2)
    recipe = build_loss("focal+dice", num_classes=2, weights={"focal": 10.0, "dice": 3.0})(logits, target)
    focal, dice = build_loss("focal", num_classes=2)(logits, target), build_loss("dice", num_classes=2)(logits, target)
    torch.testing.assert_close(recipe, 10 * focal + 3 * dice)


@pytest.mark.parametrize("pixels", [2, 5])
def test_lovasz_with_a_class_absent_in_the_middle_and_few_pixels(pixels):
    """Class 1 absent (classes after it still count); two kept pixels (the shortest sorted list with a step)."""
    logits = torch.randn(1, 3, 1, pixels, generator=torch.Generator().manual_seed(pixels))
    labels = [0, 2, 2, 0, 2][:pixels]
    target = torch.tensor([[labels]])
    probabilities = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, 3)
    expected = lovasz_by_definition(probabilities, target.reshape(-1))
    torch.testing.assert_close(build_loss("lovasz", num_classes=3)(logits, target), expected.float(), rtol=1e-5, atol=1e-6)


def test_focal_and_lovasz_defaults():
    """gamma 2 and ignore 255 when built directly; the focal mean is over the valid pixels of several."""
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([[[0, 1], [IGNORE, 2]], [[2, IGNORE], [1, 1]]])
    probabilities = logits.softmax(1)
    keep = target != IGNORE
    p = probabilities.gather(1, target.clamp(max=2).unsqueeze(1))[:, 0][keep]
    expected = ((1 - p) ** 2 * -torch.log(p)).mean()
    torch.testing.assert_close(FocalLoss()(logits, target), expected)
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, 3)[keep.reshape(-1)]
    expected = lovasz_by_definition(flat, target.reshape(-1)[keep.reshape(-1)])
    torch.testing.assert_close(LovaszSoftmaxLoss()(logits, target), expected.float(), rtol=1e-5, atol=1e-6)
