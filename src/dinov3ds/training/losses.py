"""Segmentation losses, and the logits → labels / probabilities conversions that must agree with them.

Logits are [B,K,H,W] and targets [B,H,W] int64, where pixels equal to `ignore_index` count for nothing.
K >= 2 is multi-class (softmax); K == 1 is binary with one foreground channel (sigmoid, target in {0, 1}).
The conversions live here so that inference reads logits exactly the way the losses trained them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dinov3ds.errors import UserError

LOSS_NAMES = ("ce", "dice", "ce+dice")


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """[B,K,H,W] logits → [B,H,W] int64 labels: argmax, or `logit > 0` (p > 0.5) for one channel."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[B,K,H,W] logits → class probabilities; one channel becomes [1 - p, p] so callers always see ≥ 2 classes."""
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits)
        return torch.cat([1 - foreground, foreground], dim=1)
    return logits.softmax(dim=1)


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"loss expects logits [B,K,H,W] and target [B,H,W], got {logits.shape} and {target.shape}"
        )


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy (K >= 2) or BCE-with-logits (K == 1), mean over non-ignored pixels.

    With class weights the mean is weighted (Σ w·loss / Σ w), as in `F.cross_entropy`. A batch whose pixels
    are all ignored gives 0 instead of NaN, so a crop of pure "ignore" cannot poison training.
    """

    def __init__(self, ignore_index: int = 255, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target)
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, 0)
        if logits.shape[1] == 1:
            per_pixel = F.binary_cross_entropy_with_logits(
                logits[:, 0], safe_target.to(logits.dtype), reduction="none"
            )
        else:
            per_pixel = F.cross_entropy(logits, safe_target, reduction="none")
        weight = valid.to(per_pixel.dtype)
        if self.class_weights is not None:
            weight = weight * self.class_weights.to(per_pixel.dtype)[safe_target]
        return (per_pixel * weight).sum() / weight.sum().clamp(min=torch.finfo(per_pixel.dtype).tiny)


class DiceLoss(nn.Module):
    """1 − soft Dice over the batch, ignored pixels masked out.

    Multi-class: Dice per class between softmax probabilities and one-hot targets, averaged over the classes
    present in the batch's labels. Absent classes are left out because their Dice is 0 or 1 depending only on
    stray probability mass, which would dilute the signal of rare classes; cross-entropy still penalises false
    positives of absent classes. Binary (K == 1): Dice of the sigmoid foreground. `smooth` keeps an empty
    target with an empty prediction at loss 0 and the gradient finite.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target)
        logits = logits.float()  # pixel sums in bf16/fp16 would round away whole classes
        valid = (target != self.ignore_index).unsqueeze(1).to(logits.dtype)
        safe_target = torch.where(target != self.ignore_index, target, 0)
        if logits.shape[1] == 1:
            probabilities = torch.sigmoid(logits)
            one_hot = safe_target.unsqueeze(1).to(logits.dtype)
        else:
            probabilities = logits.softmax(dim=1)
            one_hot = F.one_hot(safe_target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        probabilities, one_hot = probabilities * valid, one_hot * valid
        dims = (0, 2, 3)
        intersection = (probabilities * one_hot).sum(dims)
        cardinality = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
        if logits.shape[1] == 1:
            return 1 - dice[0]
        present = one_hot.sum(dims) > 0
        if not present.any():
            return (logits * 0).sum()
        return 1 - dice[present].mean()


class WeightedSum(nn.Module):
    """Σ weight · loss over named terms; the terms stay visible as submodules for logging."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: module for name, (_, module) in terms.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())


def build_loss(
    name: str,
    *,
    num_classes: int,
    ignore_index: int = 255,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    class_weights: list[float] | None = None,
) -> nn.Module:
    """Build a segmentation loss by name: `ce`, `dice` or `ce+dice`.

    Args:
        name: one of LOSS_NAMES.
        num_classes: classes in the labels; a binary task (1 or 2) may use a single-channel head.
        ignore_index: label value that contributes nothing.
        ce_weight, dice_weight: multiply their term (also when it is the only term).
        class_weights: per-class cross-entropy weights, one per class (2 for a binary task); Dice is unweighted.
    """
    if name not in LOSS_NAMES:
        raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    weights = None
    if class_weights is not None:
        expected = max(num_classes, 2)
        if len(class_weights) != expected:
            raise UserError(
                f"class_weights has {len(class_weights)} entries but there are {expected} classes; give one per class"
            )
        weights = torch.tensor(class_weights, dtype=torch.float32)
    terms = {}
    if "ce" in name.split("+"):
        terms["ce"] = (ce_weight, CrossEntropyLoss(ignore_index, weights))
    if "dice" in name.split("+"):
        terms["dice"] = (dice_weight, DiceLoss(ignore_index))
    return WeightedSum(terms)
