"""What differs between classification and segmentation training: loss, metric, monitor, what a batch is.

The LightningModule (`training.module.TaskModule`) is one class for both tasks; it asks its task object
these questions instead of branching on the task name.
"""

from __future__ import annotations

from torch import Tensor, nn

from dinov3ds.config import Config
from dinov3ds.heads import head_class
from dinov3ds.metrics import ClassificationMetric, SegmentationMetric
from dinov3ds.metrics.depth import DepthMetric
from dinov3ds.training.depth_loss import DepthLoss
from dinov3ds.training.losses import build_loss
from dinov3ds.training.mask_classification import MaskClassificationLoss


class ClassificationTask:
    """Cross-entropy on class indices; top-1 / top-5 over the whole validation set."""

    monitor = "val/top1"
    monitor_mode = "max"
    reported = ("top1", "top5", "mean_class_accuracy")  # shown in the progress bar: the first one

    def __init__(self, config: Config, num_classes: int) -> None:
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.loss.label_smoothing)

    def new_metric(self) -> ClassificationMetric:
        return ClassificationMetric(self.num_classes, top_k=(1, min(5, self.num_classes)))

    def validation_output(self, module: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        """Logits [B, K]: what the metric and the validation loss both take."""
        return module(inputs)

    def per_class_scalars(self, result: dict) -> dict[str, float]:
        return {}

    def validation_loss(self, output: Tensor, target: Tensor) -> Tensor | None:
        return self.criterion(output, target)


class SegmentationTask:
    """The configured segmentation loss on label maps; mIoU over the whole validation set."""

    monitor = "val/mIoU"
    monitor_mode = "max"
    reported = ("mIoU", "aAcc", "mAcc", "mDice")

    def __init__(self, config: Config, num_classes: int, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = config.data.ignore_index
        # Medical data: Dice of every structure at each validation (a mean hides the small one that fails).
        self.logged_classes = list(class_names or [])[1:] if config.data.medical is not None else []
        loss = config.loss
        if head_class(config.head.name).mask_classification:
            self.criterion = MaskClassificationLoss(num_classes, self.ignore_index, **loss.mask.model_dump())
            return
        self.criterion = build_loss(
            loss.name, num_classes=num_classes, ignore_index=self.ignore_index, class_weights=loss.class_weights,
            weights={"ce": loss.ce_weight, "dice": loss.dice_weight, "focal": loss.focal_weight,
                     "lovasz": loss.lovasz_weight}, focal_gamma=loss.focal_gamma,
        )  # fmt: skip

    def new_metric(self) -> SegmentationMetric:
        return SegmentationMetric(self.num_classes, ignore_index=self.ignore_index)

    def validation_output(self, module: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        """Label maps at the masks' own size, by the configured inference strategy (whole / slide / TTA)."""
        return module.model.predict_labels(inputs, tuple(target.shape[-2:]))

    def validation_loss(self, output: Tensor, target: Tensor) -> Tensor | None:
        return None  # the prediction is a label map here; the loss needs logits at the crop size

    def per_class_scalars(self, result: dict) -> dict[str, float]:
        """`Dice_<class>` for each foreground class of medical data (slices pooled over the split)."""
        return {f"Dice_{name}": float(result["Dice"][index + 1]) for index, name in enumerate(self.logged_classes)}


class DepthTask:
    """SILog (+ gradient matching) on metric depth; the eight depth metrics, RMSE monitored (lower is better)."""

    monitor = "val/RMSE"
    monitor_mode = "min"
    reported = ("RMSE", "AbsRel", "d1", "RMSE_log", "SqRel", "log10", "d2", "d3")

    def __init__(self, config: Config, num_classes: int, class_names: list[str] | None = None) -> None:
        depth = config.depth
        self.eigen_crop = depth.eigen_crop if depth.eigen_crop is not None else config.data.dataset == "nyu"
        self.min_depth, self.max_depth = depth.min_depth, depth.max_depth
        self.criterion = DepthLoss(depth.max_depth, variance_focus=depth.silog_lambda, scale=depth.silog_scale,
                                   gradient_weight=depth.gradient_weight)  # fmt: skip

    def new_metric(self) -> DepthMetric:
        return DepthMetric(self.min_depth, self.max_depth, self.eigen_crop)

    def validation_output(self, module: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        """Metres [B, H, W] at the ground truth's own size."""
        return module.model.predict_depth(inputs, tuple(target.shape[-2:]))

    def validation_loss(self, output: Tensor, target: Tensor) -> Tensor | None:
        return self.criterion(output, target)

    def per_class_scalars(self, result: dict) -> dict[str, float]:
        return {}


TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask, "depth": DepthTask}


def task_for(config: Config, class_names: list[str]) -> ClassificationTask | SegmentationTask | DepthTask:
    if config.task == "classification":
        return ClassificationTask(config, len(class_names))
    return TASKS[config.task](config, len(class_names), class_names)
