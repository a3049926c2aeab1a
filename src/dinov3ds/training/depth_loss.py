"""Depth losses: scale-invariant log loss (SILog) and an optional multi-scale gradient-matching term.

SILog as BTS (`bts/pytorch/bts.py`, silog_loss) and AdaBins (`loss.py`, SILogLoss): d = ln p - ln g over the
valid pixels of the batch, loss = 10 * sqrt(mean(d²) - λ mean(d)²) with λ = 0.85. Gradient matching as MiDaS
(Ranftl et al. 2020, eq. 11) on the log-depth difference, over 4 scales: it sharpens edges the SILog term
leaves blurred. Invalid pixels (depth 0, beyond max_depth, not finite) count in neither term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3ds.metrics.depth import valid_mask


class DepthLoss(nn.Module):
    """SILog (+ `gradient_weight` x gradient matching) between predicted and true depth, both [B, 1|-, H, W]."""

    def __init__(self, max_depth: float, *, variance_focus: float = 0.85, scale: float = 10.0,
                 gradient_weight: float = 0.0, scales: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.max_depth, self.variance_focus, self.scale = max_depth, variance_focus, scale
        self.gradient_weight, self.scales = gradient_weight, scales

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        prediction = prediction.reshape(target.shape[0], *target.shape[-2:]).float()
        target = target.reshape(prediction.shape).float()
        if prediction.shape[-2:] != target.shape[-2:]:
            prediction = F.interpolate(prediction[:, None], size=target.shape[-2:], mode="bilinear")[:, 0]
        valid = valid_mask(target, self.max_depth)
        if not valid.any():
            return prediction.sum() * 0.0  # a batch without any known depth teaches nothing, and breaks nothing
        difference = torch.where(valid, prediction.clamp_min(1e-6).log() - target.clamp_min(1e-6).log(), 0.0)
        count = valid.sum()
        mean = difference.sum() / count
        mean_square = difference.square().sum() / count
        loss = self.scale * (mean_square - self.variance_focus * mean.square()).clamp_min(1e-12).sqrt()
        if self.gradient_weight:
            loss = loss + self.gradient_weight * gradient_matching(difference, valid, self.scales)
        return loss


def gradient_matching(difference: Tensor, valid: Tensor, scales: int) -> Tensor:
    """MiDaS's gradient loss: the mean absolute x and y gradient of the log-depth difference, where both
    neighbours are valid, summed over `scales` halvings of the resolution."""
    total = difference.new_zeros(())
    for level in range(scales):
        step = 2**level
        d, v = difference[:, ::step, ::step], valid[:, ::step, ::step].float()
        grad_x = (d[:, :, 1:] - d[:, :, :-1]).abs() * v[:, :, 1:] * v[:, :, :-1]
        grad_y = (d[:, 1:] - d[:, :-1]).abs() * v[:, 1:] * v[:, :-1]
        total = total + (grad_x.sum() + grad_y.sum()) / v.sum().clamp_min(1)
    return total
