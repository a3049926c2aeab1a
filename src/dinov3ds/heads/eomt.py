"""EoMT, the Encoder-only Mask Transformer: the ViT's own last blocks segment, with learned queries among the tokens.

After the released code (tue-mps/eomt 7bd19dd, models/eomt.py and scale_block.py; arXiv 2503.19108) and
transformers' `EomtDinov3ForUniversalSegmentation`: `num_queries` learned queries go in front of the token
sequence entering the backbone's last `num_blocks` blocks, and those blocks (the backbone's own, frozen unless
`backbone.finetune` trains them) run on queries + CLS + registers + patches, then the backbone's final norm.
Before each of those blocks and after the norm, a prediction from the normed tokens: classes from a linear layer
over the queries (+1 "no object"), masks as a 3-layer MLP of each query dotted with the patch tokens up-sampled
x4 by two (transposed conv x2, depthwise 3x3, LayerNorm) blocks (`pmt`'s `ScaleUp`). Each query attends only to
the patches its previous prediction marks. In training each block's masking probability is annealed to 0 on its
own schedule (`set_step`, the paper's per-block start and end steps): a query is unmasked with probability
1 - p. Evaluation draws nothing: a block with p > 0 masks every query, one with p = 0 runs plain attention, so a
finished schedule evaluates without masks as the paper does and a model trained without one keeps them.

RoPE: timm's blocks rotate every token after the first `num_prefix_tokens` (CLS + registers); the queries sit in
front, so the embedding gets one identity row (sin 0, cos 1) per query ahead of the patch grid's rows and only
the patch tokens turn, as transformers' DINOv3 attention does.

Training returns every `MaskPredictions` for `training.mask_classification.MaskClassificationLoss` (pmt's);
evaluation returns log Σ_q softmax(class_q)[:-1] · sigmoid(mask_q), the paper's semantic scores (`pmt`).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dinov3ds.errors import UserError
from dinov3ds.heads.base import TokenSource
from dinov3ds.heads.pmt import MaskPredictions, MaskTransformerHead, ScaleUp, Step


class EoMTHead(MaskTransformerHead):
    """Queries, mask and class heads around the backbone's last blocks; needs the ViT's `TokenSource`."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        tokens: TokenSource | None = None,
        *,
        num_queries: Annotated[int, Field(ge=1, le=4096)] = 100,
        num_blocks: Annotated[int, Field(ge=1, le=64)] = 4,
        masked_attention: bool = True,
        annealing_start: list[Step] | None = None,
        annealing_end: list[Step] | None = None,
        annealing_power: Annotated[float, Field(gt=0, le=10)] = 0.9,
    ) -> None:
        super().__init__(in_channels, strides, num_classes)
        if tokens is None or not tokens.blocks or tokens.norm is None:
            raise UserError("head 'eomt' runs a ViT's last blocks: use a ViT backbone (ConvNeXt has no token blocks)")
        if num_queries < 1 or not 1 <= num_blocks < len(tokens.blocks):
            raise UserError(f"head 'eomt': num_queries={num_queries}, num_blocks={num_blocks}; need num_queries >= 1 and "
                            f"1 <= num_blocks < the backbone's depth ({len(tokens.blocks)})")  # fmt: skip
        self._schedule("eomt", num_blocks, masked_attention, annealing_start, annealing_end, annealing_power)
        width = in_channels[0]
        self.tokens = tokens  # not a submodule: the blocks and norm stay the backbone's (and out of the head's weights)
        self.backbone_blocks = num_blocks
        self.num_queries = num_queries
        self.patch_size = strides[0]
        self.queries = nn.Embedding(num_queries, width)
        self.classifier = nn.Linear(width, num_classes + 1)
        self.mask_mlp = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)
        )
        self.upscale = nn.Sequential(*(ScaleUp(width) for _ in range(max(1, int(math.log2(self.patch_size)) - 2))))

    def _rope(self, grid: tuple[int, int]) -> Tensor | None:
        """The backbone's RoPE for the grid, behind identity rows for the queries (see the module doc)."""
        if self.tokens.rope is None:
            return None
        rope = self.tokens.rope(*grid)  # [h*w, 2 * head_dim]: sin, then cos
        half = rope.shape[-1] // 2
        identity = torch.cat([rope.new_zeros(self.num_queries, half), rope.new_ones(self.num_queries, half)], dim=-1)
        return torch.cat([identity, rope], dim=-2)

    def _final_norm(self, x: Tensor) -> Tensor:
        """The backbone's final norm, in the head's dtype (the blocks may run in bfloat16)."""
        return self.tokens.norm(x).to(self.classifier.weight.dtype)

    def _attention_mask(self, masks: Tensor, grid: tuple[int, int], length: int, probability: Tensor) -> Tensor:
        """Queries see the patches their mask marks (> 0); in training each query sees every patch with
        probability 1 - p (drawn only when p < 1, as the reference draws)."""
        batch, queries = masks.shape[:2]
        allowed = torch.ones(batch, length, length, dtype=torch.bool, device=masks.device)
        marked = F.interpolate(masks, grid, mode="bilinear").flatten(2) > 0
        if self.training and probability < 1:
            marked = marked | (torch.rand(batch, queries, device=masks.device) > probability)[..., None]
        allowed[:, :queries, length - marked.shape[-1] :] = marked
        return allowed[:, None]

    def decode(self, features: list[Tensor], image: Tensor) -> MaskPredictions:
        """Every prediction, input side first; `features` is the token sequence [B, prefix + h*w, D] entering
        the backbone's block `depth - num_blocks` (before any norm)."""
        grid = (image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size)
        dtype = self.tokens.norm.weight.dtype  # the blocks' own (a bfloat16 backbone runs them in bfloat16)
        x = features[0].to(dtype)
        x = torch.cat([self.queries.weight.to(dtype).expand(x.shape[0], -1, -1), x], dim=1)
        rope = self._rope(grid)
        return self._through_blocks(x, self.tokens.blocks[-self.backbone_blocks :], grid, rope)
