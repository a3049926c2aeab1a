"""The classic DINO picture: the first three principal components of patch tokens as RGB, beside its image."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dinov3ds.errors import UserError


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    # Percentiles, not min/max: a few outlier tokens (e.g. high-norm artefacts) would wash out the picture.
    low, high = np.percentile(values, [1, 99])
    if high <= low:
        return np.zeros_like(values, dtype=np.uint8)
    return np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _principal_components(tokens: Tensor, count: int) -> Tensor:
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:count].T


def pca_image(patches: Tensor, foreground_threshold: float | None = None) -> np.ndarray:
    """The classic DINO picture: the first three principal components of patch tokens as RGB.

    `patches` is [C, h, w] (returns h×w×3 uint8) or [B, C, h, w] (returns B×h×w×3, one PCA over the whole
    batch so colours mean the same in every image). With `foreground_threshold`, tokens whose first component
    (scaled to 0..1, oriented so the image border reads as background) is below it are black and the
    colours come from a PCA of the foreground tokens only, as in the DINOv2 demos.
    """
    single = patches.dim() == 3
    batch = patches.unsqueeze(0) if single else patches
    if batch.dim() != 4:
        raise UserError(f"patch tokens have shape {tuple(patches.shape)}; pass [C, h, w] or [B, C, h, w]")
    b, c, h, w = batch.shape
    tokens = batch.detach().float().cpu().permute(0, 2, 3, 1).reshape(-1, c)
    keep = torch.ones(len(tokens), dtype=torch.bool)
    if foreground_threshold is not None:
        first = _principal_components(tokens, 1)[:, 0].reshape(b, h, w)
        border = torch.cat(
            [
                first[:, 0].flatten(),
                first[:, -1].flatten(),
                first[:, :, 0].flatten(),
                first[:, :, -1].flatten(),
            ]
        )
        if border.mean() > first.mean():
            first = -first
        first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12)
        keep = first.flatten() >= foreground_threshold
    picture = np.zeros((len(tokens), 3), dtype=np.uint8)
    if keep.sum() > 1:
        components = _principal_components(tokens[keep], min(3, c, int(keep.sum()))).numpy()
        for channel in range(components.shape[1]):
            picture[keep.numpy(), channel] = _scale_to_uint8(components[:, channel])
    picture = picture.reshape(b, h, w, 3)
    return picture[0] if single else picture


def save_pca_image(
    patches: Tensor,
    path: Path,
    upscale_to: tuple[int, int] | None = None,
    foreground_threshold: float | None = None,
    image: Image.Image | np.ndarray | None = None,
) -> None:
    """Write `pca_image` of one image's tokens [C, h, w] to `path`, optionally enlarged to (H, W); with
    `image`, the picture is that image and its PCA side by side, the PCA at the image's size.

    Enlarged with nearest-neighbour so each patch stays a visible square: the picture shows what the model
    sees, not a smoothed guess.
    """
    if patches.dim() == 4 and patches.shape[0] == 1:
        patches = patches[0]
    if patches.dim() != 3:
        raise UserError(
            f"save_pca_image takes one image's tokens [C, h, w], got {tuple(patches.shape)}; save each image"
        )
    picture = Image.fromarray(pca_image(patches, foreground_threshold))
    if image is not None:
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        resized = np.asarray(picture.resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST))
        picture = Image.fromarray(np.concatenate([rgb, resized], axis=1))
    elif upscale_to is not None:
        picture = picture.resize((upscale_to[1], upscale_to[0]), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
