"""Segmentation losses, and the logits → labels / probabilities conversions that must agree with them.

Logits are [B,K,H,W] and targets [B,H,W] int64, where pixels equal to `ignore_index` count for nothing.
K >= 2 is multi-class (softmax); K == 1 is binary with one foreground channel (sigmoid, target in {0, 1}).
The conversions live here so that inference reads logits exactly the way the losses trained them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dinov3ds.errors import UserError
from dinov3ds.models.inference import argmax_classes

TERMS = ("ce", "dice", "focal", "lovasz")  # a loss name joins some of these with "+", e.g. focal+dice


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """[B,K,H,W] logits → [B,H,W] int64 labels: argmax, or `logit > 0` (p > 0.5) for one channel."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return argmax_classes(logits)


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


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., arXiv 1708.02002): (1 - p_t)^gamma · CE per pixel, mean over non-ignored pixels.

    The seed's `FocalLoss` averages over every pixel, ignored ones counting 0; here the mean is over the pixels
    that count, like cross-entropy. One channel: the binary form, p_t from the sigmoid."""

    def __init__(self, ignore_index: int = 255, gamma: float = 2.0) -> None:
        super().__init__()
        self.ignore_index, self.gamma = ignore_index, gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target)
        logits = logits.float()
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, 0)
        if logits.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0], safe_target.float(), reduction="none")
        else:
            ce = F.cross_entropy(logits, safe_target, reduction="none")
        focal = (1 - torch.exp(-ce)) ** self.gamma * ce
        return (focal * valid).sum() / valid.sum().clamp(min=1)


def lovasz_gradient(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1 - sorted_truth).cumsum(0)
    jaccard = 1 - intersection / union
    if len(jaccard) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-Softmax (Berman et al., arXiv 1705.08790): the convex surrogate of 1 - IoU per class, averaged over
    the classes present in the batch's labels (the seed's `classes='present'`), ignored pixels left out."""

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target)
        probabilities = logits_to_probabilities(logits.float()).permute(0, 2, 3, 1).reshape(-1, max(logits.shape[1], 2))
        labels = target.reshape(-1)
        keep = labels != self.ignore_index
        probabilities, labels = probabilities[keep], labels[keep]
        losses = []
        for cls in range(probabilities.shape[1]):
            truth = (labels == cls).float()
            if not truth.any():
                continue
            errors = (truth - probabilities[:, cls]).abs()
            errors, order = errors.sort(descending=True)
            losses.append(errors @ lovasz_gradient(truth[order]))
        return torch.stack(losses).mean() if losses else (logits * 0).sum()


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
    weights: dict[str, float] | None = None,
    class_weights: list[float] | None = None,
    focal_gamma: float = 2.0,
) -> nn.Module:
    """Build a segmentation loss from its name: terms of TERMS joined by "+" (`ce`, `ce+dice`, `focal+dice`,
    `ce+lovasz`, ...), each multiplied by `weights[term]` (default 1; the seed's MRI recipe is focal+dice with
    focal 10, dice 3).

    Args:
        num_classes: classes in the labels; a binary task (1 or 2) may use a single-channel head.
        ignore_index: label value that contributes nothing.
        class_weights: per-class cross-entropy weights, one per class (2 for a binary task); the other terms
            are unweighted.
        focal_gamma: the focal term's focusing exponent.
    """
    terms = name.split("+")
    unknown = [term for term in terms if term not in TERMS]
    if unknown or len(set(terms)) != len(terms) or not name:
        raise UserError(f"unknown loss {name!r}; join terms from {', '.join(TERMS)} with '+', e.g. ce+dice")
    class_weight_tensor = None
    if class_weights is not None:
        expected = max(num_classes, 2)
        if len(class_weights) != expected:
            raise UserError(
                f"class_weights has {len(class_weights)} entries but there are {expected} classes; give one per class"
            )
        class_weight_tensor = torch.tensor(class_weights, dtype=torch.float32)
    modules = {
        "ce": lambda: CrossEntropyLoss(ignore_index, class_weight_tensor),
        "dice": lambda: DiceLoss(ignore_index),
        "focal": lambda: FocalLoss(ignore_index, focal_gamma),
        "lovasz": lambda: LovaszSoftmaxLoss(ignore_index),
    }
    weights = weights or {}
    return WeightedSum({term: (weights.get(term, 1.0), modules[term]()) for term in terms})
