"""Mask-classification training as Mask2Former defines it, for heads that predict (class, mask) pairs (PMT).

Per image and per prediction: the semantic label map becomes one binary target mask per class present
(ignored pixels in none), queries are matched to targets by the Hungarian algorithm on
`class_weight · (-p(class)) + mask_weight · BCE + dice_weight · Dice` computed on `num_points` uniformly
sampled points, and the matched pairs are scored with cross-entropy over the classes (+1 "no object",
weighted `no_object_weight`), and with BCE and Dice on `num_points` points chosen by uncertainty (|logit|
smallest among `oversample_ratio · num_points` random ones, `importance_ratio` of them, the rest random).
The loss is summed over every prediction (deep supervision). Points come from torch's global generator,
which Lightning seeds and the checkpoints store, so runs repeat and resume exactly; the draws happen in the
order Hugging Face transformers' `Mask2FormerLoss` makes them, which tests/test_pmt.py checks value by value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dinov3ds.heads.pmt import MaskPredictions


def semantic_targets(labels: Tensor, num_classes: int, ignore_index: int) -> list[tuple[Tensor, Tensor]]:
    """Per image: (class ids [T], binary masks [T, H, W] float) of the classes present, in increasing order."""
    targets = []
    for label in labels:
        present = torch.unique(label)
        present = present[(present != ignore_index) & (present >= 0) & (present < num_classes)]
        targets.append((present, (label[None] == present[:, None, None]).float()))
    return targets


def point_values(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values [N, P] of maps [N, H, W] at points [N, P, 2] given as (x, y) in [0, 1]."""
    grid = 2.0 * points[:, :, None] - 1.0
    return F.grid_sample(maps[:, None], grid, align_corners=False)[:, 0, :, 0]


def pairwise_costs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean BCE and Dice loss between every predicted [Q, P] and target [T, P] point set: two [Q, T] tables."""
    points = logits.shape[1]
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (positive / points) @ targets.T + (negative / points) @ (1 - targets).T
    probabilities = logits.sigmoid()
    dice = 1 - (2 * probabilities @ targets.T + 1) / (probabilities.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    return bce, dice


def uncertain_points(logits: Tensor, count: int, oversample_ratio: float, importance_ratio: float) -> Tensor:
    """Points [N, count, 2] per mask: the most uncertain (|logit| smallest) of a random oversample, then random."""
    masks = logits.shape[0]
    candidates = torch.rand(masks, int(count * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_values(logits, candidates).abs()
    important = int(importance_ratio * count)
    chosen = torch.topk(uncertainty, k=important, dim=1).indices
    points = torch.gather(candidates, 1, chosen[..., None].expand(-1, -1, 2))
    if count > important:
        points = torch.cat([points, torch.rand(masks, count - important, 2, device=logits.device)], dim=1)
    return points


class MaskClassificationLoss(nn.Module):
    """The weighted class, mask-BCE and mask-Dice losses of every prediction, summed (see the module doc)."""

    def __init__(self, num_classes: int, ignore_index: int, *, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_ratio: float = 0.75, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        self.weights = {"class": class_weight, "mask": mask_weight, "dice": dice_weight}
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    @torch.no_grad()
    def match(self, masks: Tensor, classes: Tensor, targets: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Per image: (query indices, target indices) of the cheapest one-to-one assignment."""
        matches = []
        for image_masks, image_classes, (ids, target_masks) in zip(masks, classes, targets):
            points = torch.rand(1, self.num_points, 2, device=masks.device)
            predicted = point_values(image_masks.float(), points.expand(image_masks.shape[0], -1, -1))
            wanted = point_values(target_masks, points.expand(target_masks.shape[0], -1, -1))
            bce, dice = pairwise_costs(predicted, wanted)
            cost = (self.weights["mask"] * bce - self.weights["class"] * image_classes.float().softmax(-1)[:, ids]
                    + self.weights["dice"] * dice)  # fmt: skip
            largest = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return matches

    def _normaliser(self, count: int, device: torch.device) -> Tensor:
        """Matched masks per process, averaged over processes under DDP, at least 1."""
        total = torch.tensor(float(count), device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            world = dist.get_world_size()
        return (total / world).clamp_min(1.0)

    def terms(self, masks: Tensor, classes: Tensor, targets: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Unweighted `class`, `mask` (BCE) and `dice` losses of one prediction."""
        matches = self.match(masks, classes, targets)
        images = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)])
        queries = torch.cat([rows for rows, _ in matches])
        wanted_classes = torch.full(classes.shape[:2], self.num_classes, dtype=torch.long, device=classes.device)
        wanted_classes[images, queries] = torch.cat([ids[cols] for (ids, _), (_, cols) in zip(targets, matches)]).to(
            classes.device
        )
        class_loss = F.cross_entropy(classes.float().transpose(1, 2), wanted_classes, weight=self.class_weights)
        predicted = masks[images, queries].float()
        wanted = torch.cat([target_masks[cols] for (_, target_masks), (_, cols) in zip(targets, matches)])
        normaliser = self._normaliser(len(queries), masks.device)
        with torch.no_grad():
            points = uncertain_points(predicted, self.num_points, self.oversample_ratio, self.importance_ratio)
            point_labels = point_values(wanted, points)
        point_logits = point_values(predicted, points)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1).sum()
        probabilities = point_logits.sigmoid()
        dice = 1 - (2 * (probabilities * point_labels).sum(-1) + 1) / (probabilities.sum(-1) + point_labels.sum(-1) + 1)
        return {"class": class_loss, "mask": bce / normaliser, "dice": dice.sum() / normaliser}

    def forward(self, predictions: MaskPredictions, labels: Tensor) -> Tensor:
        targets = semantic_targets(labels, self.num_classes, self.ignore_index)
        total = predictions.masks[0].new_zeros(())
        for masks, classes in zip(predictions.masks, predictions.classes):
            for name, value in self.terms(masks, classes, targets).items():
                total = total + self.weights[name] * value
        return total
