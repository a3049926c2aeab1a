"""The `data.medical` config section: how a slice of an MRI or CT volume becomes the backbone's RGB input.

One set of options for training and inference, stored in every checkpoint, so a model sees the same
arrays at both. Kept apart from `schema.py` because it is the one section with rules between its fields.
It also holds the medical-only training augmentations (rotation, vertical flip, foreground crops) and
`derived`: what self-configuration (`data/medical_plan.py`) set from the dataset's fingerprint, and why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MRI_ONLY = ("zscore", "zscore_over", "clip", "gamma")
CT_ONLY = ("window", "percentiles", "intensity_range")
# Fields that change training batches but not a slice's pixels: left out of the slice cache's key.
TRAINING_ONLY = ("rotation", "rotation_probability", "vertical_flip", "foreground_share", "derived")


class Derived(BaseModel):
    """One setting self-configuration chose: its value and where it came from. A value in the config that differs
    from `value` was set by the user afterwards, and wins."""

    model_config = ConfigDict(extra="forbid")

    value: Any
    source: str


class SlicePreprocessing(BaseModel):
    """MRI: z-score per slice (the seed's recipe) or per volume (nnU-Net's), clip, rescale to 0-255, gamma. CT:
    Hounsfield units clipped to a window (or to percentiles of the training cases' foreground, nnU-Net's rule)
    and rescaled to 0-255. Then up to three volume channels, or three neighbouring slices (2.5D), become R, G, B."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    modality: Literal["mri", "ct"] = "mri"  # from dataset.json for nnU-Net data ("CT" → ct, else mri)
    # MRI only
    zscore: bool = True  # standardise to mean 0, std 1 (a constant slice becomes all zeros)
    # over what the z-score's mean and std are taken: each slice (the seed's recipe), or the whole volume per
    # channel (nnU-Net's per-image scheme; the same statistics for every slice of a scan)
    zscore_over: Literal["slice", "volume"] = "slice"
    clip: float | None = Field(2.0, gt=0)  # clip z-scores to [-clip, clip]; None keeps the full range
    gamma: float | None = Field(0.75, gt=0)  # out = 255 * (x / 255) ** gamma; < 1 lifts low intensities
    # CT only: a window [level, width] in HU (e.g. [40, 400] soft tissue, [-600, 1500] lung), or else the
    # range between these percentiles of the training cases' foreground voxels (computed once, stored in
    # `intensity_range`, so inference uses the training range)
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_range: tuple[float, float] | None = None
    # Which volume channels the backbone sees as R, G, B, repeated in turn when fewer than three (e.g.
    # [1, 2, 3] for T1ce, T2, FLAIR of BraTS; [0, 1] shows 0, 1, 0); None: the first three channels
    input_channels: list[int] | None = Field(None, min_length=1, max_length=3)
    volume_channels: int = Field(1, ge=1, le=64)  # channels of the training volumes (set from dataset.json)
    context: int = Field(0, ge=0, le=16)  # 2.5D: slices i-context, i, i+context of one channel as R, G, B
    axes: list[Literal[0, 1, 2]] = Field(default_factory=lambda: [2], min_length=1)  # slicing axes for training
    target_spacing: float | None = Field(None, gt=0)  # mm: slices resampled in-plane to it (and back) if set
    channels: int = Field(3, ge=1)  # gray value repeated to this many channels (3 for RGB backbones)
    # Training only (nnU-Net's 2D augmentation): rotate a slice by up to +-rotation degrees with this probability
    rotation: float = Field(0.0, ge=0, le=180)
    rotation_probability: float = Field(0.0, ge=0, le=1)
    vertical_flip: bool = False  # mirror along the second image axis too (the horizontal flip is data.augment's)
    # share of training crops forced to hold foreground: a class drawn uniformly, then a slice and a crop with it
    # (nnU-Net: one third), so a rare structure is seen as often as a large one
    foreground_share: float = Field(0.0, ge=0, le=1)
    # what self-configuration set (dotted key -> value and source); written by the run, see data/medical_plan.py
    derived: dict[str, Derived] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SlicePreprocessing:
        # Compared with the defaults, not with what was given: a saved config lists every field.
        other = CT_ONLY if self.modality == "mri" else MRI_ONLY
        misplaced = sorted(name for name in other if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True))
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} apply to {'CT' if self.modality == 'mri' else 'MRI'} only; "
                             f"remove them or set modality")  # fmt: skip
        # `clip` is measured in standard deviations; on raw intensities it would flatten the image.
        if self.modality == "mri" and self.clip is not None and not self.zscore:
            raise ValueError("clip is in standard deviations and needs zscore: true; set clip: null")
        if self.window is not None and self.window[1] <= 0:
            raise ValueError(f"window {list(self.window)} is [level, width]: the width must be positive")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles {list(self.percentiles)} must satisfy 0 <= low < high <= 100")
        if self.context and self.input_channels is not None and len(set(self.input_channels)) > 1:
            raise ValueError("context (2.5D) shows neighbouring slices of one channel; give one input channel")
        return self
