"""The LightningModule: one training step, validation, optimizer and checkpoint contents for any task.

What differs by task (loss, metric, monitored value, what validation predicts) comes from a task object
(`training.tasks`); the grid of a linear probe (pooling x blocks x learning rates) is its own module
(`training.probe_grid`). Devices, precision, logging and resuming are Lightning's.
"""

from __future__ import annotations

import dataclasses
import math
import random

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor

from dinov3ds import __version__
from dinov3ds.config import Config
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import FORMAT_VERSION
from dinov3ds.models.tasks import Classifier, Segmenter
from dinov3ds.training.probe_grid import ProbeGrid, probe_settings
from dinov3ds.training.tasks import task_for


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float, cosine: bool) -> float:
    """Learning-rate multiplier: linear warm-up from 0, then cosine decay to `min_ratio` (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict:
    """Generator states as tensors and ints only, so the checkpoint still loads with weights_only=True."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state.tolist()), gauss))


class TaskModule(L.LightningModule):
    """Loss, metrics, optimizer and checkpoint contents for a Classifier or a Segmenter."""

    def __init__(self, model: Classifier | Segmenter, config: Config, class_names: list[str], from_features: bool = False):
        super().__init__()
        self.model = model
        self.config = config
        self.class_names = class_names
        self.from_features = from_features  # batches are cached feature vectors, not images
        self.strict_loading = False  # checkpoints hold the head only; the backbone comes from its weight file
        self.num_classes = len(class_names)
        self.task = task_for(config, list(class_names))
        self.criterion = self.task.criterion  # a submodule, so class weights follow the device
        self.val_metric = self.task.new_metric()
        self.monitor = self.task.monitor
        self.grid = self._build_grid(config, model)
        self.last_validation: dict = {}
        self.validated_step = -1  # the global step of the last validation
        self.best = {"score": None, "epoch": None, "step": None, "metrics": {}}  # the best validation so far
        self.train_sampler = None  # set by the trainer: told where a resumed epoch starts
        self.shown_loss: float | None = None  # the loss read at the last logging interval
        self.register_buffer("nonfinite_loss", torch.zeros((), dtype=torch.bool), persistent=False)

    def _build_grid(self, config: Config, model) -> ProbeGrid | None:
        if probe_settings(config) is None:
            return None
        model.head.requires_grad_(False)  # trained through the grid; becomes a copy of the best head
        return ProbeGrid(config, model.backbone.feature_channels(model.layers)[-1], self.num_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model.head(inputs) if self.from_features else self.model(inputs)

    def _features(self, inputs: Tensor) -> Tensor:
        return inputs if self.from_features else self.model.features(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        inputs, target = batch
        if self.grid is not None:
            losses = [self.criterion(logits, target) for logits in self.grid.logits(self._features(inputs))]
            # Each head's gradient comes from its own loss (the heads share nothing), so the sum is what is
            # minimised; the mean is what is shown, comparable with a single head's loss.
            for tag, head_loss in zip(self.grid.tags, losses):
                self.log(f"train/loss_{tag}", head_loss, on_step=True, on_epoch=False)
            loss_sum = torch.stack(losses).sum()
            self._observe(loss_sum / len(losses), batch_index)
            return loss_sum
        if not isinstance(self.model, Classifier):
            self.model.head.set_step(self.global_step)  # a head's own schedule (PMT's mask annealing)
        loss = self.criterion(self(inputs), target)
        self._observe(loss, batch_index)
        return loss

    def _observe(self, loss: Tensor, batch_index: int) -> None:
        """Log the loss and check it is finite, reading it on the host only at logging intervals."""
        # Accumulate the check on the device and read it (and the loss shown in the progress bar) once per
        # logging interval: a per-step read is a host-device sync that stalls the GPU pipeline.
        self.nonfinite_loss |= ~torch.isfinite(loss.detach())
        if batch_index % self.config.trainer.log_every_n_steps == 0:
            self._stop_if_nonfinite()
            self.shown_loss = float(loss.detach())
        # Not prog_bar=True: Lightning converts progress-bar metrics to Python numbers after every batch.
        self.log("train/loss", loss, on_step=True, on_epoch=False)

    def _stop_if_nonfinite(self) -> None:
        if bool(self.nonfinite_loss):
            raise UserError(
                f"training loss became NaN/Inf at step {self.global_step}; lower optim.lr or use precision 32 "
                f"(the last good checkpoint in {self.config.output_dir}/checkpoints is kept)"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> None:
        inputs, target = batch
        if self.grid is not None:
            self.grid.update(self._features(inputs), target)
            return
        output = self.task.validation_output(self, inputs, target)
        loss = self.task.validation_loss(output, target)
        if loss is not None:
            self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        self.val_metric.update(output, target)

    def on_validation_epoch_start(self) -> None:
        self._stop_if_nonfinite()  # before ModelCheckpoint could save a broken head

    def on_validation_epoch_end(self) -> None:
        if self.grid is not None:
            results = self.grid.select_best()
            self.model.head = self.grid.frozen_copy(self.grid.best)  # what forward, reports and checkpoints use
            for tag, grid_result in zip(self.grid.tags, results):
                self.log(f"val/top1_{tag}", float(grid_result["top1"]))
            result = results[self.grid.best]
        else:
            result = self.val_metric.compute()
            self.val_metric.reset()
        for key in self.task.reported:
            if key in result and not (isinstance(result[key], float) and math.isnan(result[key])):
                self.log(f"val/{key}", float(result[key]), prog_bar=key == self.task.reported[0])
        for key, value in self.task.per_class_scalars(result).items():
            if not math.isnan(value):
                self.log(f"val/{key}", value)
        self.last_validation = result
        self._remember(result)
        if self.best.get("probe"):  # the head best.ckpt holds (the best validation so far), as the summary names it
            self.log("val/best_lr", float(self.best["probe"]["lr"]))
            self.log("val/best_last_blocks", float(self.best["probe"]["last_blocks"]))

    def _remember(self, result: dict) -> None:
        """Note this validation's step, and whether it is the best so far (as the `best` checkpoint decides)."""
        self.validated_step = self.global_step
        score = result.get(self.monitor.removeprefix("val/"))
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return
        score = float(score)
        previous = self.best["score"]
        if previous is None or (score < previous if self.task.monitor_mode == "min" else score > previous):
            scalars = {f"val/{k}": float(v) for k, v in result.items()
                       if isinstance(v, float) or (torch.is_tensor(v) and v.numel() == 1)}  # fmt: skip
            self.best = {"score": score, "epoch": self.current_epoch, "step": self.global_step, "metrics": scalars}
            if self.grid is not None:  # which head of the grid that was
                self.best["probe"] = dataclasses.asdict(self.grid.settings[self.grid.best])

    def configure_optimizers(self):
        optim = self.config.optim
        parameters = self.grid.parameter_groups() if self.grid is not None else self._parameter_groups()
        if optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, total, optim.warmup_steps, optim.min_lr_ratio, optim.scheduler == "cosine"),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """A grid's heads are clipped one by one (one norm over all of them would tie each head to the others)."""
        if self.grid is None or gradient_clip_val is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for group in optimizer.param_groups:  # one group per head
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(group["params"], gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    def _parameter_groups(self) -> list[dict]:
        """The head at `lr`; what trains in the backbone at its own lr (`backbone_lr`, else `lr` x
        `backbone_lr_scale`), scaled per layer by timm's layer-wise decay (earlier layers hold more general
        features and should move less), with timm's no-weight-decay rule for biases, norms and tokens."""
        from timm.optim import param_groups_layer_decay

        optim = self.config.optim
        backbone_ids = {id(p) for p in self.model.backbone.parameters()}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids],
                   "lr": optim.lr}]  # fmt: skip
        top_lr = optim.backbone_lr if optim.backbone_lr is not None else optim.lr * optim.backbone_lr_scale
        timm_model = self.model.backbone.model
        if not any(p.requires_grad for p in timm_model.parameters()):
            return groups
        no_decay = timm_model.no_weight_decay() if hasattr(timm_model, "no_weight_decay") else ()
        decayed = param_groups_layer_decay(timm_model, weight_decay=optim.weight_decay, no_weight_decay_list=no_decay,
                                           layer_decay=optim.layer_decay)  # fmt: skip
        for group in decayed:  # timm leaves out parameters that do not train
            groups.append({"params": group["params"], "lr": top_lr * group["lr_scale"], "weight_decay": group["weight_decay"]})
        return groups

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the head, drop the frozen backbone, and record what is needed to rebuild and resume."""
        if any(not torch.isfinite(p).all() for p in self.parameters() if p.requires_grad):
            raise UserError(
                f"the head's weights became NaN/Inf at step {self.global_step}; lower optim.lr or use precision 32 "
                f"(the last good checkpoint in {self.config.output_dir}/checkpoints is kept)"
            )
        frozen = {name for name, p in self.model.backbone.named_parameters(prefix="model.backbone") if not p.requires_grad}
        frozen |= {name for name, _ in self.model.backbone.named_buffers(prefix="model.backbone")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        config = self.config.model_dump(mode="json")
        checkpoint["dinov3ds"] = {
            "format_version": FORMAT_VERSION,
            "dinov3ds_version": __version__,
            "task": self.config.task,
            "config": config,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "backbone": self.model.backbone.identity,
        }
        if self.grid is not None:
            # The head saved is the grid's best: the file describes that head alone, and keeps the run's own
            # config (the grid) for --resume to compare with.
            checkpoint["dinov3ds"]["config"] = self.grid.winner_config(config)
            checkpoint["dinov3ds"]["run_config"] = config
            checkpoint["probe_grid_best"] = self.grid.best
        checkpoint["rng_states"] = _rng_state()
        checkpoint["best_validation"] = self.best

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restored now, not in on_train_start: FitLoop.setup_data creates the resumed epoch's train-loader
        # iterator (which draws its seeds from the global RNG) before on_train_start, and nothing between here
        # and there draws random numbers. So a resumed run draws the same shuffles and augmentations as an
        # uninterrupted one (tests/test_cli_classification.py: resume after SIGKILL).
        if checkpoint.get("rng_states") is not None:
            _set_rng_state(checkpoint["rng_states"])
        if checkpoint.get("best_validation") is not None:
            self.best = checkpoint["best_validation"]
        if self.grid is not None and checkpoint.get("probe_grid_best") is not None:
            # Lightning loads the state dict next: the model's head must already have the saved winner's size.
            self.grid.best = int(checkpoint["probe_grid_best"])
            self.model.head = self.grid.frozen_copy(self.grid.best)
        # Lightning restarts a non-stateful loader at the start of the epoch; skip the batches already trained.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = int(progress.get("current", {}).get("completed", 0))
        if self.train_sampler is not None and done and not progress.get("is_last_batch", False):
            self.train_sampler.resume_at(int(checkpoint["epoch"]), done * self.config.data.batch_size)
