"""The typed config tree: every section, every field with its default and range, a comment each.

Every field has its default here and nowhere else; `config.loading` turns YAML and overrides into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from dinov3ds.config.medical import SlicePreprocessing

MAX_SIDE = 16384  # pixels: larger sides are typos (an int overflow deep in torch otherwise)


def _expand(path: str | None) -> str | None:
    """`~` and `$VAR` in a path, expanded once here: a literal `./~/x` folder is a disaster waiting for `rm -rf ~`."""
    return None if path is None else os.path.expandvars(os.path.expanduser(path))


def cache_dir() -> Path:
    """Where dinov3ds keeps caches (hashes, features, medical slices): $DINOV3DS_CACHE, else ~/.cache/dinov3ds."""
    return Path(os.environ.get("DINOV3DS_CACHE", Path.home() / ".cache" / "dinov3ds"))


PathText = Annotated[str, AfterValidator(_expand)]
Positive = Annotated[int, Field(ge=1)]
Side = Annotated[int, Field(ge=16, le=MAX_SIDE)]


class Section(BaseModel):
    """Strict by default: a typo in a key is an error, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """peft's LoRA / DoRA on the transformer blocks' (ConvNeXt: the pointwise) linear layers."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    # block layer names: ViT qkv, proj, fc1, fc2 (SwiGLU variants: fc1_g, fc1_x, fc2), ConvNeXt fc1, fc2;
    # None = every one of them (never patch_embed.proj)
    targets: list[str] | None = None


class BackboneConfig(Section):
    name: str = "vits16"  # Meta's variant name, e.g. vits16, vitl16, vitl16_sat493m, convnext_tiny
    # None: Meta's file in checkpoints/, else the Hugging Face cache; a .pth / .safetensors file or model folder,
    # hf-hub:<repo id>, or "random" (smoke tests only)
    weights: Annotated[str | None, AfterValidator(_expand)] = None
    layers: list[int] | None = None  # 0-based taps for multi-layer heads; None = four even intervals
    # Storage/compute dtype of the backbone. auto: bfloat16 when training with bf16 precision, the backbone is
    # frozen and the device computes bf16 natively (autocast would re-cast every weight each step), and for
    # eval/predict/features/pca/knn on a GPU or CPU (AMX, AVX512-BF16, Arm BF16) that computes bf16 natively;
    # else float32 (--float32 forces it at inference). The head and its outputs stay float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    overrides: dict[str, Any] = Field(default_factory=dict)  # timm architecture overrides (tests: depth)
    unfreeze_last_blocks: int = Field(0, ge=0)  # finetune last_blocks: how many (a value > 0 alone means last_blocks)
    # How much of the backbone trains: frozen (the feature store works), the last blocks, LoRA / DoRA adapters
    # (peft) on the blocks' linear layers, or all of it. Checkpoints keep only what trained.
    finetune: Literal["frozen", "last_blocks", "lora", "dora", "full"] = "frozen"
    lora: LoraConfig = Field(default_factory=lambda: LoraConfig())
    grad_checkpointing: bool = False  # timm's: recompute block activations in backward (less memory, ~30 % slower)

    @model_validator(mode="after")
    def _finetune_mode(self) -> BackboneConfig:
        if self.finetune == "frozen" and self.unfreeze_last_blocks:
            object.__setattr__(self, "finetune", "last_blocks")  # the older spelling of the same setting
        if self.finetune == "last_blocks" and not self.unfreeze_last_blocks:
            raise ValueError("backbone.finetune=last_blocks needs backbone.unfreeze_last_blocks=N (N >= 1)")
        return self


class DataConfig(Section):
    dataset: Literal["imagenette", "image_folder", "ade20k", "segmentation_folder", "nnunet", "depth_folder", "nyu"] = "image_folder"
    root: PathText = "data"  # dataset folder (the one holding the splits)
    train_split: str = "train"  # sub-folder of the training split
    val_split: str = "val"  # sub-folder of the validation split
    fold: int = Field(0, ge=0)  # nnunet: the fold of splits_final.json (when present) used for validation
    val_fraction: float = Field(0.2, gt=0, lt=1)  # nnunet without splits_final.json: share of cases for val
    image_size: Side = 224  # classification crop, or segmentation training crop
    eval_size: Side | None = None  # segmentation: shorter side at evaluation (None = as stored)
    base_size: Side | None = None  # segmentation: shorter side that scale_range multiplies (None = image_size)
    scale_range: tuple[Annotated[float, Field(gt=0, le=16)], Annotated[float, Field(gt=0, le=16)]] = (0.5, 2.0)  # segmentation random resize ratios
    photometric: bool = True  # segmentation: mmseg's PhotoMetricDistortion on training images
    # segmentation: re-draw a training crop while one class covers this share of it (ADE20K protocol 0.75)
    cat_max_ratio: float = Field(1.0, gt=0, le=1)
    augment: bool = True  # False: eval transform for training too (enables the feature cache)
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32  # per device
    eval_batch_size: Annotated[int, Field(ge=1, le=65536)] | None = None  # None = batch_size
    num_workers: int = Field(4, ge=0, le=256)  # data-loading processes per device
    class_names: list[str] | None = None  # display names; None = folder names / dataset's own
    num_classes: Annotated[int, Field(ge=1, le=65536)] | None = None  # classes (None = len(class_names) / folders)
    ignore_index: int = Field(255, ge=0, le=65535)  # label value excluded from loss and metrics
    images_dir: str = "images"  # segmentation folders: images sub-folder
    annotations_dir: str = "annotations"  # segmentation folders: masks sub-folder
    mask_suffix: str = ".png"  # segmentation folders: mask file suffix replacing the image's
    label_map: dict[int, int] | None = None  # remap stored mask values, e.g. {255: 1}
    reduce_zero_label: bool = False  # 0 → ignore, v → v-1 (ADE20K convention)
    medical: SlicePreprocessing | None = None  # MRI/CT slices: intensity, channels, 2.5D (see config/medical.py)
    on_bad_sample: Literal["error", "warn"] = "error"  # orphan image/mask, empty class folder, unreadable file: stop, or skip with a warning


    @field_validator("scale_range")
    @classmethod
    def _scale_range_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError("scale_range must be [low, high] with low <= high")
        return value


class HeadConfig(Section):
    name: str = "linear"  # classification: linear; segmentation: linear, segdino, dpt, unet, fapm
    pooling: Literal["cls", "avg", "cls+avg"] = "cls+avg"  # classification: which tokens feed the linear layer
    last_blocks: int = Field(1, ge=1, le=64)  # classification: concatenate the pooled features of the last N blocks
    batchnorm: bool = False  # classification: BatchNorm (no affine) before the linear layer
    # depth, head linear: the CLS token beside each tap's patch map (DINOv2's linear / linear4 protocol: true;
    # DINOv3's NYU protocol, config-nyu.yaml decoder_head.use_cls_token: false); checkpoints without it: true
    cls_token: bool = True
    # classification probe grid, as DINOv3's linear evaluation ([1, 4] and [cls, cls+avg]): one head per
    # combination (and per optim.lr_grid rate) trained at once on one pass of features; the best is kept
    grid_last_blocks: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=1)] | None = None
    grid_pooling: Annotated[list[Literal["cls", "avg", "cls+avg"]], Field(min_length=1)] | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # head-specific options, e.g. {base_channels: 128}
    # segmentation: start from a transformers EoMT folder (save_pretrained) or hf-hub: id (eomt); its backbone is the run's
    weights: PathText | None = None


class MaskLossConfig(Section):
    """Heads that predict (class, mask) pairs (pmt): Mask2Former's matching costs and loss weights."""

    num_points: int = Field(12544, ge=1)  # points per mask for matching and for the mask losses (112 x 112)
    oversample_ratio: float = Field(3.0, ge=1)  # random candidates per point for uncertainty sampling
    importance_ratio: float = Field(0.75, ge=0, le=1)  # share of points taken where |logit| is smallest
    class_weight: float = Field(2.0, ge=0)  # cross-entropy over classes (+ "no object")
    mask_weight: float = Field(5.0, ge=0)  # sigmoid BCE on the sampled points
    dice_weight: float = Field(5.0, ge=0)  # Dice on the sampled points
    no_object_weight: float = Field(0.1, ge=0)  # the "no object" class's cross-entropy weight


class LossConfig(Section):
    # segmentation loss: ce, dice, focal, lovasz joined by "+" (e.g. ce+dice, focal+dice); classification uses ce
    name: Annotated[str, Field(pattern=r"^(ce|dice|focal|lovasz)(\+(ce|dice|focal|lovasz))*$")] = "ce"
    ce_weight: float = Field(1.0, ge=0)  # weight of the cross-entropy term
    dice_weight: float = Field(1.0, ge=0)  # weight of the Dice term
    focal_weight: float = Field(1.0, ge=0)  # weight of the focal term (the seed's MRI recipe: 10, with dice 3)
    lovasz_weight: float = Field(1.0, ge=0)  # weight of the Lovász-Softmax term
    focal_gamma: float = Field(2.0, ge=0)  # the focal term's focusing exponent
    class_weights: list[Annotated[float, Field(ge=0)]] | None = None  # per-class cross-entropy weights
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # classification only
    mask: MaskLossConfig = Field(default_factory=MaskLossConfig)  # mask-classification heads (pmt) instead of `name`


class OptimConfig(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=100)  # peak learning rate
    weight_decay: float = Field(1e-3, ge=0)
    momentum: float = Field(0.9, ge=0, le=1)  # sgd only
    scheduler: Literal["cosine", "constant"] = "cosine"  # after warm-up
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0, in optimizer steps
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of lr
    # linear probe: train one head per lr at once, keep the best
    lr_grid: Annotated[list[Annotated[float, Field(gt=0, le=100)]], Field(min_length=1)] | None = None
    backbone_lr: float | None = Field(None, gt=0)  # trained backbone: its peak lr (None = lr x backbone_lr_scale)
    backbone_lr_scale: float = Field(0.1, gt=0, le=10)  # trained backbone: its lr as a multiple of lr
    # trained backbone: timm's layer-wise decay, each layer's lr is this times the next one's (1 = none)
    layer_decay: float = Field(1.0, gt=0, le=1)


class TrainerConfig(Section):
    max_epochs: Positive | None = 10  # None with max_steps for iteration-based schedules
    max_steps: int = Field(-1, ge=-1)  # -1 = no limit (ADE20K protocol: 40000)
    precision: Literal["32", "bf16-mixed", "16-mixed", "bf16-true"] = "32"
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: int | str | list[int] = "auto"  # per node
    num_nodes: Positive = 1
    strategy: str = "auto"  # auto, ddp, ...
    # steps (int) or fraction of an epoch; None = each epoch
    val_check_interval: Positive | Annotated[float, Field(gt=0, le=1)] | None = None
    check_val_every_n_epoch: Positive | None = 1
    gradient_clip_val: float | None = Field(None, gt=0)
    log_every_n_steps: Positive = 10
    deterministic: bool = False  # bit-reproducible kernels (slower)
    progress_bar: bool = True
    compile: bool = False  # torch.compile the backbone blocks; falls back to eager on failure
    # where metrics go, each through Lightning's own logger with the CSV's metric names: csv (always: the report
    # and --resume read it), tensorboard, mlflow (output_dir/mlruns unless MLFLOW_TRACKING_URI is set), wandb
    # (offline into output_dir/wandb unless WANDB_MODE=online); mlflow and wandb are the extras of the same names
    logger: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["csv", "tensorboard"])

    @field_validator("logger")
    @classmethod
    def _csv_kept(cls, value: list[str]) -> list[str]:
        if "csv" not in value:
            raise ValueError("must include csv: the run report and --resume read metrics.csv")
        return list(dict.fromkeys(["csv", *value]))  # the CSV first: Lightning's trainer.logger is the first one

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        # `trainer.precision=32` on the command line (and `precision: 32` in YAML) parses as an int.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class InferenceConfig(Section):
    mode: Literal["whole", "slide"] = "whole"  # segmentation prediction strategy
    crop: Side | None = None  # slide window (None = data.image_size)
    stride: Annotated[int, Field(ge=1, le=MAX_SIDE)] | None = None  # slide stride (None = 2/3 of crop)
    window_batch: Positive = 8  # windows per forward in slide mode
    flip: bool = False  # horizontal-flip TTA
    # multi-scale TTA
    scales: Annotated[list[Annotated[float, Field(gt=0, le=8)]], Field(min_length=1)] = Field(default_factory=lambda: [1.0])
    batch_size: Positive = 8  # images per forward in predict
    volume_axis: int = Field(2, ge=0, le=2)  # NIfTI volumes: slicing axis
    # volumes: predict along each of these axes and average the probabilities (None = [volume_axis]); train on
    # the same axes (data.medical.axes) for it to help
    volume_axes: list[Literal[0, 1, 2]] | None = Field(None, min_length=1)
    volume_batch_size: Positive = 16  # volumes: axial slices per forward (other axes: as many pixels)


class CacheConfig(Section):
    """The feature store of linear probes (cache_features): see dinov3ds.training.feature_cache."""

    fingerprint: Literal["stat", "content"] = "stat"  # stat: trust file size + mtime; content: hash the bytes
    dtype: Literal["float16", "float32"] = "float16"  # stored features (float16: half the disk, see README)
    shard_size: int = Field(8192, ge=1)  # rows per shard file: the unit of resuming and of splitting over ranks


class DepthConfig(Section):
    """task: depth: the range the head predicts in, how depth files are stored, and the loss (see heads/depth.py)."""

    min_depth: float = Field(1e-3, gt=0)  # metres: the first bin's centre (DINOv2/3: 0.001)
    max_depth: float = Field(10.0, gt=0, le=1e5)  # metres: the last bin; deeper ground truth is invalid (NYU: 10)
    bins: int = Field(256, ge=2, le=4096)  # linear bins between min_depth and max_depth (DINOv2/3: 256)
    bins_norm: Literal["softmax", "linear"] = "softmax"  # bin weights: softmax, or Meta's ReLU + 0.1, normalised
    depth_scale: float | None = Field(None, gt=0)  # stored value per metre (None: 1000 for 16-bit PNG, 1 for .npy)
    eigen_crop: bool | None = None  # score inside Eigen's NYU crop only (None: on for data.dataset nyu)
    # training random crop [height, width] (None: data.image_size square; DINOv3 NYU: [416, 544]), each side
    # rounded down to the backbone's input multiple; frames smaller than it are padded with unknown depth
    train_crop: tuple[Side, Side] | None = None
    # training frames first cut to a fixed box: full (none), or nyu (Meta's NYUCrop: columns 43-608, rows 45-472
    # of NYU's 640x480 frame, scaled to the frame's size: its white border never trains)
    train_fixed_crop: Literal["full", "nyu"] = "full"
    depth_dir: str = "depth"  # depth_folder: the depth maps' sub-folder beside images_dir
    silog_lambda: float = Field(0.85, ge=0, le=1)  # SILog variance focus (BTS / AdaBins: 0.85)
    silog_scale: float = Field(10.0, gt=0)  # SILog multiplier (BTS / AdaBins: 10)
    gradient_weight: float = Field(0.0, ge=0)  # MiDaS multi-scale gradient matching term (0 = off)

    @model_validator(mode="after")
    def _ordered(self) -> DepthConfig:
        if self.min_depth >= self.max_depth:
            raise ValueError("depth.min_depth must be below depth.max_depth")
        return self


class Config(Section):
    task: Literal["classification", "segmentation", "depth"] = "classification"
    output_dir: PathText = "output/run"  # config.yaml, checkpoints, logs and pictures go here
    seed: int = Field(0, ge=0, lt=2**32)
    cache_features: bool = True  # linear classification without augmentation: compute features once
    cache: CacheConfig = Field(default_factory=CacheConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    depth: DepthConfig = Field(default_factory=DepthConfig)  # task: depth
