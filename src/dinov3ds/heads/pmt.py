"""PMT, the Plain Mask Transformer: mask classification on a frozen ViT, the strongest frozen-backbone segmenter.

After the released code (tue-mps/pmt, image/models/pmt.py and pmd.py, 5813efb; arXiv 2603.25398): four taps,
each passed through the backbone's final norm (done by the backbone) and a BatchNorm, then a residual MLP
(D → D/2 → D) times a learned per-channel scale, summed. `num_queries` learned queries go in front of the
tokens (prefix tokens kept) and `num_blocks` DINOv3 blocks of the backbone's width and head count run on the
sequence, with the backbone's own RoPE on the patch tokens (timm's `EvaBlock`: q and v biased, k not, layer
scale 1). Before every block and after the last, a prediction: classes from a linear layer over the queries
(+1 "no object"), masks as a 3-layer MLP of each query dotted with the patch tokens up-sampled x4 by two
(transposed conv x2, depthwise 3x3, LayerNorm) blocks. Each query attends only to the patches its previous
prediction marks, with a per-block probability that is annealed to 0 during training (`set_step`), so the
finished model runs plain attention.

Training returns every block's `MaskPredictions` for `training.mask_classification.MaskClassificationLoss`;
evaluation returns log per-pixel class scores, log Σ_q softmax(class_q)[:-1] · sigmoid(mask_q), so the
softmax that inference applies gives the reference's scores normalised per pixel (same arg-max).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable
from functools import partial
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import LayerNorm2d
from timm.models.eva import EvaBlock
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import SegmentationHead, TokenSource, Width

Step = Annotated[int, Field(ge=0, le=100_000_000)]  # a training step of the annealing schedule


class MaskPredictions(NamedTuple):
    """One entry per prediction, input side first: mask logits [B, Q, 4h, 4w] and class logits [B, Q, K + 1]."""

    masks: list[Tensor]
    classes: list[Tensor]


def annealed_probability(step: int, start: int, end: int, power: float) -> float:
    """1 before `start`, 0 from `end` on, (1 - progress) ** power between (the reference's mask annealing)."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


class ScaleUp(nn.Module):
    """x2: transposed conv 2x2 stride 2, GELU, depthwise 3x3, LayerNorm over channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        self.norm = LayerNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.depthwise(self.act(self.up(x))))


class MaskTransformerHead(SegmentationHead):
    """What PMT and EoMT share: learned queries run through transformer blocks with a mask-and-class prediction
    before each block (masking that block's attention) and after the last, each block's masking probability
    annealed on its own schedule. Subclasses supply `decode`, `_final_norm` and `_attention_mask`."""

    reads_tokens = True
    mask_classification = True

    def _schedule(self, name: str, num_blocks: int, masked_attention: bool, start: list[int] | None,
                  end: list[int] | None, power: float) -> None:  # fmt: skip
        """Check and keep the annealing options (None: masked attention on at every step, as the reference)."""
        if (start is None) != (end is None):
            raise UserError(f"head '{name}': give annealing_start and annealing_end together (or neither: masks stay on)")
        if start is not None and (len(start) != num_blocks or len(end) != num_blocks
                                  or any(s > e for s, e in zip(start, end))):  # fmt: skip
            raise UserError(f"head '{name}': annealing_start and annealing_end need {num_blocks} steps each, start <= end")
        self.masked_attention = masked_attention
        self.schedule = (list(start), list(end), power) if start else None
        self.register_buffer("mask_probabilities", torch.ones(num_blocks))

    def set_step(self, step: int) -> None:
        """Anneal each block's masked-attention probability to the training step (called before each step)."""
        if self.schedule is None:
            return
        start, end, power = self.schedule
        for index in range(len(self.mask_probabilities)):
            self.mask_probabilities[index] = annealed_probability(step, start[index], end[index], power)

    @abstractmethod
    def decode(self, features: list[Tensor], image: Tensor) -> MaskPredictions:
        """Every prediction, input side first."""

    @abstractmethod
    def _final_norm(self, x: Tensor) -> Tensor:
        """The token sequence normed as the predictions read it."""

    def _predict(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Mask logits [B, Q, 4h, 4w] and class logits [B, Q, K + 1] from the token sequence `x`."""
        x = self._final_norm(x)
        queries = x[:, : self.num_queries]
        patches = x[:, self.num_queries + self.tokens.num_prefix_tokens :]
        patches = patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_mlp(queries), self.upscale(patches))
        return masks, self.classifier(queries)

    @abstractmethod
    def _attention_mask(self, masks: Tensor, grid: tuple[int, int], length: int, probability: Tensor) -> Tensor:
        """Which tokens each token may attend to in the next block [B, 1, length, length], from `masks`."""

    def _through_blocks(self, x: Tensor, blocks: Iterable[nn.Module], grid: tuple[int, int],
                        rope: Tensor | None) -> MaskPredictions:  # fmt: skip
        """Run `blocks` on queries + tokens `x`, predicting before each block and after the last."""
        predictions = MaskPredictions([], [])
        for index, block in enumerate(blocks):
            probability = self.mask_probabilities[index]
            attention_mask = None
            # Evaluating with the mask annealed away, the intermediate predictions would go unused.
            if self.masked_attention and (self.training or probability > 0):
                masks, classes = self._predict(x, grid)
                predictions.masks.append(masks)
                predictions.classes.append(classes)
                if probability > 0:
                    attention_mask = self._attention_mask(masks, grid, x.shape[1], probability)
            x = block(x, rope=rope, attn_mask=attention_mask)
        masks, classes = self._predict(x, grid)
        predictions.masks.append(masks)
        predictions.classes.append(classes)
        return predictions

    def forward(self, features: list[Tensor], image: Tensor) -> MaskPredictions | Tensor:
        predictions = self.decode(features, image)
        if self.training:
            return predictions
        return semantic_logits(predictions.masks[-1], predictions.classes[-1], image.shape[-2:])


class PMTHead(MaskTransformerHead):
    """Mask-classification decoder on ViT taps; needs the backbone's tokens and RoPE (`TokenSource`)."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        tokens: TokenSource | None = None,
        *,
        num_queries: Annotated[int, Field(ge=1, le=4096)] = 100,
        num_blocks: Annotated[int, Field(ge=1, le=64)] = 6,
        mlp_dim: Width | None = None,
        masked_attention: bool = True,
        annealing_start: list[Step] | None = None,
        annealing_end: list[Step] | None = None,
        annealing_power: Annotated[float, Field(gt=0, le=10)] = 0.9,
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if tokens is None:
            raise UserError("head 'pmt' reads a ViT's tokens: use a ViT backbone (ConvNeXt has no tokens or RoPE)")
        if len(set(in_channels)) != 1 or len(set(strides)) != 1:
            raise UserError("head 'pmt' needs taps of one width and stride (a ViT's blocks)")
        self._schedule("pmt", num_blocks, masked_attention, annealing_start, annealing_end, annealing_power)
        width = in_channels[0]
        self.tokens = tokens
        self.num_queries = num_queries
        self.patch_size = strides[0]
        self.tap_norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in in_channels)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width)) for _ in in_channels
        )
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(width)) for _ in in_channels)
        self.queries = nn.Embedding(num_queries, width)
        self.blocks = nn.ModuleList(
            EvaBlock(width, tokens.num_heads, qkv_bias=True, qkv_fused=False, mlp_ratio=(mlp_dim or width) / width,
                     init_values=1.0, num_prefix_tokens=num_queries + tokens.num_prefix_tokens,
                     rotate_half=tokens.rotate_half, norm_layer=partial(nn.LayerNorm, eps=1e-5))
            for _ in range(num_blocks)
        )  # fmt: skip
        self.norm = nn.LayerNorm(width)
        self.upscale = nn.Sequential(*(ScaleUp(width) for _ in range(max(1, int(math.log2(self.patch_size)) - 2))))
        self.mask_mlp = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.classifier = nn.Linear(width, num_classes + 1)

    def _final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x)

    def _attention_mask(self, masks: Tensor, grid: tuple[int, int], length: int, probability: Tensor) -> Tensor:
        """Queries see the patches their mask marks (> 0), and every patch with probability 1 - p."""
        batch, queries = masks.shape[:2]
        allowed = torch.ones(batch, length, length, dtype=torch.bool, device=masks.device)
        marked = F.interpolate(masks, grid, mode="bilinear").flatten(2) > 0
        keep = torch.rand(batch, queries, device=masks.device) <= probability
        allowed[:, :queries, length - marked.shape[-1] :] = marked | ~keep[..., None]
        return allowed[:, None]

    def decode(self, features: list[Tensor], image: Tensor) -> MaskPredictions:
        """Every prediction, input side first; `features` are token sequences [B, prefix + h*w, D] per tap."""
        grid = (image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size)
        taps = []
        for tokens, norm, projection, scale in zip(features, self.tap_norms, self.projections, self.scales):
            tokens = norm(tokens.transpose(1, 2)).transpose(1, 2)
            taps.append((tokens + projection(tokens)) * scale)
        x = torch.stack(taps).sum(0)
        x = torch.cat([self.queries.weight.expand(x.shape[0], -1, -1), x], dim=1)
        rope = self.tokens.rope(*grid) if self.tokens.rope is not None else None
        return self._through_blocks(x, self.blocks, grid, rope)


def semantic_scores(masks: Tensor, classes: Tensor) -> Tensor:
    """Per-pixel class scores [B, K, H, W] = Σ_q softmax(classes_q)[:-1] · sigmoid(masks_q)."""
    return torch.einsum("bqhw,bqk->bkhw", masks.sigmoid(), classes.softmax(-1)[..., :-1])


def semantic_logits(masks: Tensor, classes: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """log of the scores at `size` (masks up-sampled bilinearly first, as the reference evaluates)."""
    masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return semantic_scores(masks, classes).clamp_min(torch.finfo(masks.dtype).tiny).log()
