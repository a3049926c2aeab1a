"""What `predict` read before it predicts a volume: slices, spacing, orientation, modality, one line per case;
and a warning when the case's modality is not the one the model was trained on (CT given to an MRI model).

The modality comes from the DICOM Modality tag, or for NIfTI from the values: CT is stored in Hounsfield units
(air near -1000), MRI has no such negative values. Headers are read (DICOM without pixel data); NIfTI values
from a strided sample of the volume.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np

from dinov3ds.commands.output_files import printable
from dinov3ds.commands.volumes import VolumeInput
from dinov3ds.data.dicom import LPS_TO_RAS, dicom_files
from dinov3ds.data.volumes import read_header

logger = logging.getLogger("dinov3ds")

NAMES = {"ct": "CT", "mri": "MRI"}
CT_AIR = -500.0  # values this low exist only in CT (Hounsfield units: air -1000)
NOT_CT = -50.0  # a volume whose lowest value is above this has no air in HU: not CT


def _dicom(item: VolumeInput) -> tuple[str, str | None]:
    import pydicom

    files = dicom_files(item.files[0])
    first = pydicom.dcmread(files[0], stop_before_pixels=True)  # no file: IndexError, left to the loader
    tag = str(first.get("Modality", "")).upper()
    rows, columns = (float(v) for v in first.get("PixelSpacing", [0, 0]))
    thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 0)) or 0)
    cosines = [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = cosines[:3], cosines[3:]
    affine[:3, 2] = np.cross(cosines[:3], cosines[3:])
    orientation = "".join(nib.aff2axcodes(LPS_TO_RAS @ affine))
    modality = {"CT": "ct", "MR": "mri"}.get(tag)
    line = (f"{len(files)} slices {int(first.get('Columns', 0))}x{int(first.get('Rows', 0))}, spacing "
            f"{columns:g} x {rows:g} x {thickness:g} mm, orientation {orientation}, modality {tag or 'not given'}")  # fmt: skip
    return line, modality


def _nifti(item: VolumeInput) -> tuple[str, str | None]:
    image = read_header(item.files[0])
    shape, zooms = image.shape, image.header.get_zooms()[:3]
    sample = np.asarray(image.dataobj[tuple(slice(None, None, max(1, s // 64)) for s in shape[:3])], dtype=np.float32)
    low = float(np.nanmin(sample)) if sample.size else 0.0
    modality = "ct" if low <= CT_AIR else "mri" if low > NOT_CT else None
    guess = {"ct": f"looks like CT (values down to {low:g}, HU)", "mri": f"not CT (lowest value {low:g}; CT air is -1000 HU)"}
    depth = shape[2] if len(shape) > 2 else 1
    channels = f", {len(item.files)} channels" if len(item.files) > 1 else ""
    line = (f"{depth} slices {shape[0]}x{shape[1]}{channels}, spacing {' x '.join(f'{z:g}' for z in zooms)} mm, "
            f"orientation {''.join(nib.aff2axcodes(image.affine))}, modality {guess.get(modality, f'unknown (lowest value {low:g})')}")  # fmt: skip
    return line, modality


def announce_volumes(items: list[VolumeInput], config: dict) -> None:
    """Print one line per case of what was read; warn when its modality differs from the model's."""
    medical = (config.get("data") or {}).get("medical") or {}
    trained = medical.get("modality")
    for item in items:
        try:
            line, modality = (_dicom if item.dicom else _nifti)(item)
        except Exception:  # noqa: BLE001 (a damaged file: the loader that follows names it in one line)
            continue
        print(f"{printable(item.name)}: {line}")
        if trained and modality and modality != trained:
            logger.warning("WARNING: %s looks like %s but this model was trained on %s slices: its predictions "
                           "will not be reliable; use a model trained on %s", item.name, NAMES[modality],
                           NAMES[trained], NAMES[modality])  # fmt: skip
