"""DINOv3's linear-evaluation grid: one linear head per (pooling, last blocks, learning rate), all trained at
once on one feature vector; the best on validation is kept.

Every head reads the widest vector the grid needs (the CLS tokens of the most blocks asked for, then the
patch mean of the last block), taking its own columns of it: exactly the vector a Classifier built with that
head's pooling and block count computes. Heads share no parameter, start from the seeded initialisation a
lone head of their size gets, and clip their gradients alone, so each trains as it would in a run of its own
(tests/test_probe_grid.py trains both ways and compares).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinov3ds.config import Config
from dinov3ds.errors import UserError
from dinov3ds.metrics import ClassificationMetric
from dinov3ds.models.tasks import LinearClassificationHead


@dataclass(frozen=True)
class ProbeSetting:
    """One head of the grid."""

    pooling: str  # cls, avg or cls+avg
    last_blocks: int  # CLS tokens of this many last blocks (1 for avg: it reads the last block's patch mean)
    lr: float


def probe_settings(config: Config) -> list[ProbeSetting] | None:
    """The grid's heads in config order, or None when the config asks for a single head."""
    head, optim = config.head, config.optim
    if not (optim.lr_grid or head.grid_pooling or head.grid_last_blocks):
        return None
    if config.task != "classification":
        raise UserError("optim.lr_grid, head.grid_pooling and head.grid_last_blocks are for classification linear "
                        "probes; remove them for segmentation")  # fmt: skip
    poolings = head.grid_pooling or [head.pooling]
    counts = head.grid_last_blocks or [head.last_blocks]
    rates = optim.lr_grid or [optim.lr]
    # pooling avg reads no CLS token: every block count gives the same head, kept once
    found = (ProbeSetting(p, 1 if p == "avg" else n, lr) for p in poolings for n in counts for lr in rates)
    return list(dict.fromkeys(found))


def widest(settings: list[ProbeSetting]) -> tuple[str, int]:
    """(pooling, last_blocks) of the vector that holds every head's input."""
    with_cls = any(s.pooling != "avg" for s in settings)
    with_mean = any(s.pooling != "cls" for s in settings)
    pooling = "cls+avg" if with_cls and with_mean else "cls" if with_cls else "avg"
    return pooling, max((s.last_blocks for s in settings if s.pooling != "avg"), default=1)


def input_config(config: Config) -> Config:
    """The config a grid's Classifier is built from: the widest pooling and block count (the config itself
    without a grid). The checkpoint records the winner's own pooling and block count instead."""
    settings = probe_settings(config)
    if settings is None or not (config.head.grid_pooling or config.head.grid_last_blocks):
        return config
    pooling, last_blocks = widest(settings)
    wide = config.model_copy(deep=True)
    wide.head.pooling, wide.head.last_blocks = pooling, last_blocks
    return wide


def columns(setting: ProbeSetting, wide_pooling: str, wide_blocks: int, width: int) -> Tensor:
    """Indices of `setting`'s vector in the wide one: [CLS of the last n blocks, patch mean] as Classifier
    lays them out (the wide vector holds `wide_blocks` CLS tokens of `width` first, the mean last)."""
    cls_tokens = wide_blocks if wide_pooling != "avg" else 0
    picked: list[int] = []
    if setting.pooling != "avg":
        picked += range((cls_tokens - setting.last_blocks) * width, cls_tokens * width)
    if setting.pooling != "cls":
        picked += range(cls_tokens * width, (cls_tokens + 1) * width)
    return torch.tensor(picked, dtype=torch.long)


class ColumnHead(LinearClassificationHead):
    """A linear head on some columns of a wider vector. Its state_dict is a plain head's (the columns are
    not saved), so a checkpoint of it loads into the Classifier of its own pooling and block count."""

    def __init__(self, picked: Tensor, num_classes: int, batchnorm: bool, seed: int) -> None:
        super().__init__(len(picked), num_classes, batchnorm, seed)
        self.register_buffer("picked", picked, persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features.index_select(1, self.picked))


class ProbeGrid(nn.Module):
    """The grid's heads, their validation metrics and the index of the best one so far."""

    def __init__(self, config: Config, width: int, num_classes: int) -> None:
        super().__init__()
        self.settings = probe_settings(config) or []
        wide_pooling, wide_blocks = widest(self.settings)
        self.heads = nn.ModuleList(
            ColumnHead(
                columns(s, wide_pooling, wide_blocks, width), num_classes, config.head.batchnorm, config.seed
            )
            for s in self.settings
        )
        self.metrics = nn.ModuleList(
            ClassificationMetric(num_classes, top_k=(1, min(5, num_classes))) for _ in self.heads
        )
        self.tags = [self._tag(config, s) for s in self.settings]
        self.best = 0

    @staticmethod
    def _tag(config: Config, setting: ProbeSetting) -> str:
        """The head's name in logged metrics: what varies in the grid, e.g. `cls+avg_last4_lr0.001`."""
        parts = [setting.pooling] if config.head.grid_pooling else []
        parts += [f"last{setting.last_blocks}"] if config.head.grid_last_blocks else []
        return "_".join([*parts, f"lr{setting.lr:g}"])

    def logits(self, features: Tensor) -> list[Tensor]:
        return [head(features) for head in self.heads]

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(head.parameters()), "lr": s.lr} for head, s in zip(self.heads, self.settings)]

    def update(self, features: Tensor, target: Tensor) -> None:
        for metric, logits in zip(self.metrics, self.logits(features)):
            metric.update(logits, target)

    def select_best(self) -> list[dict]:
        """Every head's validation result (metrics reset); the best top-1 becomes `best` (first on ties)."""
        results = [metric.compute() for metric in self.metrics]
        for metric in self.metrics:
            metric.reset()
        self.best = max(range(len(results)), key=lambda i: results[i]["top1"])
        return results

    def frozen_copy(self, index: int) -> ColumnHead:
        """Head `index` as the model's own head: a copy that stays as it is while the grid trains on."""
        head = copy.deepcopy(self.heads[index])
        return head.requires_grad_(False)

    def winner_config(self, config: dict) -> dict:
        """`config` (a dumped Config) as the config of the best head alone: its pooling, block count and
        learning rate, no grid. What eval, predict and export rebuild from the checkpoint."""
        setting = self.settings[self.best]
        head = {**config["head"], "pooling": setting.pooling, "last_blocks": setting.last_blocks,
                "grid_pooling": None, "grid_last_blocks": None}  # fmt: skip
        optim = {**config["optim"], "lr": setting.lr, "lr_grid": None}
        return {**config, "head": head, "optim": optim}
