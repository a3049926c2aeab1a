"""Self-configuration for medical data: settings derived from the dataset fingerprint, as nnU-Net's planner does.

A medical dataset (`data.dataset: nnunet`, or a slice folder `prepare-volumes` wrote, recognised by its
`volumes.json`) trains with nnU-Net's choices instead of ADE20K's unless the config says otherwise:

- augmentation as nnU-Net's 2D trainer: no photometric distortion, scale 0.7-1.4, rotation by up to 180 degrees
  (15 when the median slice is more than 1.5 times as long as wide) with probability 0.2, mirroring along both
  in-plane axes, a third of the crops forced onto a structure drawn uniformly among the classes;
- nnU-Net's loss, cross-entropy + Dice;
- geometry from the median spacing: slices across the coarsest axis (isotropic: axis 2, nnU-Net's first array
  axis), resampled in-plane to the finer in-plane median spacing; the crop side is the median slice's longer
  side rounded up to a multiple of SIDE_MULTIPLE, the resize base its shorter side (so a slice keeps its scale);
- intensity per nnU-Net's scheme for the channel: MRI (and any channel not named CT) a z-score over the whole
  volume, clipped where the training foreground's z-scores end (the 0.5 / 99.5 percentiles); CT clipped to the
  foreground's 0.5-99.5 percentiles in HU and scaled linearly (nnU-Net's z-score with the foreground's mean and
  std after that clip is a linear map of the same values: the backbone's normalisation follows either way).

A key the config or the command line sets wins (pydantic's `model_fields_set` tells which were given); the
intensity keys are one recipe, so setting any of them keeps all. Every derived value is written with its
source to `data.medical.derived`, which the run's config.yaml keeps; a value there that differs from the
recorded one was edited by the user afterwards, and wins.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from dinov3ds.config import Config
from dinov3ds.config.medical import Derived, SlicePreprocessing
from dinov3ds.data.fingerprint import Fingerprint, format_fingerprint, spread
from dinov3ds.errors import UserError

logger = logging.getLogger("dinov3ds")

SIDE_MULTIPLE = 32  # a multiple of every backbone's (16) and head's (1, 16 or 32) input multiple
MAX_SIDE = 512  # derived crops stop here (nnU-Net's 2D patches of 512 x 512 CT slices)
MRI_INTENSITY = ("data.medical.zscore", "data.medical.zscore_over", "data.medical.clip", "data.medical.gamma")
CT_INTENSITY = ("data.medical.window", "data.medical.intensity_range")
CtRange = Callable[[tuple[float, float]], tuple[float, float]]


@dataclass(frozen=True)
class Setting:
    key: str  # dotted config key
    value: Any
    source: str  # where the value came from, in words


def medical_kind(config: Config) -> str | None:
    """"nnunet" (volumes), "slices" (a prepare-volumes folder) or None: which data self-configuration serves."""
    data = config.data
    if config.task != "segmentation":
        return None
    if data.dataset == "nnunet":
        return "nnunet"
    if data.dataset == "segmentation_folder" and (Path(data.root) / "volumes.json").is_file():
        return "slices"
    return None


def _augmentation(aspect: float) -> list[Setting]:
    rotation = 15.0 if aspect > 1.5 else 180.0
    why = f"median slice aspect {aspect:.2f} {'>' if aspect > 1.5 else '<='} 1.5"
    return [
        Setting("data.photometric", False, "medical data: no colour distortion of intensities (nnU-Net has none)"),
        Setting("data.scale_range", [0.7, 1.4], "nnU-Net's scaling range"),
        Setting("data.medical.rotation", rotation, f"nnU-Net's 2D rotation range ({why})"),
        Setting("data.medical.rotation_probability", 0.2, "nnU-Net's rotation probability"),
        Setting("data.medical.vertical_flip", True, "nnU-Net mirrors along both in-plane axes"),
        Setting("data.medical.foreground_share", 0.33, "nnU-Net forces a third of the crops onto foreground"),
        Setting("loss.name", "ce+dice", "nnU-Net's loss: cross-entropy + Dice"),
    ]


def _slice_axis(median: list[float]) -> tuple[int, str]:
    coarsest = max(median)
    tied = [axis for axis in range(3) if median[axis] >= 0.99 * coarsest]
    if len(tied) == 3:
        return 2, "isotropic median spacing: axis 2, as nnU-Net (its first array axis)"
    return tied[-1], f"the coarsest axis of the median spacing {' x '.join(f'{v:g}' for v in median)} mm"


def _sizes(sides: list[list[float]]) -> tuple[list[Setting], float]:
    """Crop side and resize base from the in-plane sides of the training slices (per case, in pixels)."""
    median = np.median(np.asarray(sides, dtype=np.float64), 0)
    longer, shorter = float(median.max()), float(median.min())
    side = min(MAX_SIDE, max(SIDE_MULTIPLE, math.ceil(longer / SIDE_MULTIPLE) * SIDE_MULTIPLE))
    shape = " x ".join(f"{v:g}" for v in median)
    return [
        Setting("data.image_size", side, f"median slice {shape} px: its longer side rounded up to a multiple of "
                                         f"{SIDE_MULTIPLE}" + (f", at most {MAX_SIDE}" if side == MAX_SIDE else "")),
        Setting("data.base_size", max(16, round(shorter)), f"median slice {shape} px: its shorter side, so slices keep "
                                                           "their scale (times data.scale_range)"),
    ], longer / max(shorter, 1.0)  # fmt: skip


def _geometry(fingerprint: Fingerprint, chosen_axis: tuple[int, str] | None) -> tuple[list[Setting], float]:
    if fingerprint.kind == "slices":
        axis = fingerprint.slice_axis
        plane = [a for a in range(3) if a != axis]
        settings, aspect = _sizes([[shape[a] for a in plane] for shape in fingerprint.shapes])
        return [*settings, Setting("inference.volume_axis", axis, f"prepare-volumes sliced along axis {axis}")], aspect
    median = spread(fingerprint.spacings)["median"]
    axis, why = _slice_axis(median) if chosen_axis is None else (chosen_axis[0], f"{chosen_axis[1]} set in the config")
    plane = [a for a in range(3) if a != axis]
    target = round(min(median[a] for a in plane), 6)
    sides = [[shape[a] * spacing[a] / target for a in plane] for shape, spacing in zip(fingerprint.shapes, fingerprint.spacings, strict=True)]
    settings, aspect = _sizes(sides)
    return [
        Setting("data.medical.axes", [axis], why),
        Setting("inference.volume_axis", axis, why),
        Setting("data.medical.target_spacing", target, f"the finer in-plane median spacing (axes {plane[0]}, {plane[1]})"),
        *settings,
    ], aspect


def _intensity(fingerprint: Fingerprint, medical: SlicePreprocessing, ct_range: CtRange | None) -> list[Setting]:
    if fingerprint.kind == "slices":
        return []  # 16-bit slices keep no volume statistics: their per-slice z-score stays
    if medical.modality == "ct":
        if medical.window is not None:
            return []  # the config's window is the CT recipe
        channel, low, high = fingerprint.channels[0], *medical.percentiles
        if (low, high) == (0.5, 99.5) and channel.percentile_00_5 is not None:
            value = [channel.percentile_00_5, channel.percentile_99_5]
        elif ct_range is not None:  # other percentiles than the fingerprint's: the training cases sampled again
            value = list(ct_range((low, high)))
        else:
            return []
        return [Setting("data.medical.intensity_range", value, f"CT: the training foreground's {low:g}-{high:g} "
                                                               "percentiles in HU (nnU-Net's CT clip)")]  # fmt: skip
    spans = [abs(v) for c in fingerprint.channels for v in (c.zscored_00_5, c.zscored_99_5) if v is not None]
    clip = max(1.0, math.ceil(2 * max(spans)) / 2) if spans else 3.0
    return [
        Setting("data.medical.zscore", True, "nnU-Net's z-score for MRI and other channels"),
        Setting("data.medical.zscore_over", "volume", "nnU-Net z-scores each image (volume), not each slice"),
        Setting("data.medical.clip", clip, "the training foreground's z-scores lie within +-" + f"{clip:g} "
                                           "(0.5 / 99.5 percentiles): 0-255 spans them"),  # fmt: skip
        Setting("data.medical.gamma", None, "nnU-Net applies no gamma"),
    ]


def _section(config: Config, key: str):
    *path, name = key.split(".")
    section = config
    for part in path:
        section = getattr(section, part)
    return section, name


def _plain(value: Any) -> str:
    return json.dumps(value, default=list)


def _given(config: Config, key: str, recorded: dict[str, Derived]) -> bool:
    """The config or the command line set `key` (and not to the value self-configuration recorded for it)."""
    section, name = _section(config, key)
    if section is None or name not in section.model_fields_set:  # data.medical unset: nothing in it given
        return False
    return key not in recorded or _plain(recorded[key].value) != _plain(getattr(section, name))


def _not_default(config: Config, key: str) -> bool:
    """A key the plan leaves alone (CT's window) counts for its recipe only when set to something: a saved
    config.yaml lists `window: null`."""
    section, name = _section(config, key)
    return section is not None and getattr(section, name) != type(section).model_fields[name].get_default(call_default_factory=True)


def plan(fingerprint: Fingerprint, medical: SlicePreprocessing, ct_range: CtRange | None = None,
         chosen_axis: tuple[int, str] | None = None) -> list[Setting]:  # fmt: skip
    """Every setting nnU-Net's rules derive from the fingerprint (before the config's own keys are consulted);
    `ct_range(percentiles)` measures a CT range for percentiles other than the fingerprint's; `chosen_axis`
    (axis, the key that set it) is the slicing axis the config names, which the other settings then follow."""
    geometry, aspect = _geometry(fingerprint, chosen_axis)
    return [*_augmentation(aspect), *geometry, *_intensity(fingerprint, medical, ct_range)]


def self_configure(config: Config, fingerprint: Fingerprint, ct_range: CtRange | None = None) -> list[str]:
    """Apply the plan to `config` where the config leaves a key unset; returns the report lines (the fingerprint,
    then each setting with its value and source), logged when they change the config."""
    data = config.data
    medical = data.medical or SlicePreprocessing()
    recorded = dict(medical.derived)
    chosen_axis = None  # training and prediction slice along one axis: the one the config names, if it names one
    if _given(config, "data.medical.axes", recorded):
        chosen_axis = (medical.axes[0], "data.medical.axes")
    elif _given(config, "inference.volume_axis", recorded):
        chosen_axis = (config.inference.volume_axis, "inference.volume_axis")
    settings = plan(fingerprint, medical, ct_range, chosen_axis)
    planned = {s.key for s in settings}
    given = {key for key in planned if _given(config, key, recorded)}
    for group in (MRI_INTENSITY, CT_INTENSITY):  # one recipe: a key of it set keeps the whole of it
        if any(key in given if key in planned else _not_default(config, key) for key in group):
            given |= planned & set(group)
    chosen = [s for s in settings if s.key not in given]
    updates = {s.key.removeprefix("data.medical."): s.value for s in chosen if s.key.startswith("data.medical.")}
    derived = {s.key: Derived(value=s.value, source=s.source) for s in chosen}
    try:
        # exclude_unset: the keys given stay the only ones marked set (with the derived ones, recorded as such)
        data.medical = SlicePreprocessing.model_validate({**medical.model_dump(exclude_unset=True), **updates, "derived": derived})
        for setting in chosen:
            if not setting.key.startswith("data.medical."):
                section, name = _section(config, setting.key)
                setattr(section, name, setting.value)
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"data.medical: the derived settings clash with the config's ({reason}); set the clashing key "
                        "in the config too") from None  # fmt: skip
    lines = format_fingerprint(fingerprint) + ["settings derived from it (a key set in the config wins):"]
    for setting in settings:
        section, name = _section(config, setting.key)
        how = "set in the config" if setting.key in given else setting.source
        lines.append(f"  {setting.key} = {_plain(getattr(section, name))}  ({how})")
    if recorded != derived:
        for line in lines:
            logger.info(line)
    return lines
