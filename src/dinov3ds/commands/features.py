"""Feature tools: dump features of a folder, PCA pictures of patch features, k-NN evaluation.

    dinov3ds features --backbone vits16 photos/ --out feats.npz
    dinov3ds pca --backbone vits16 photo.jpg --out pca/
    dinov3ds knn --backbone vits16 --root data/imagenette2-320
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov3ds.commands.output_files import OutputFolder
from dinov3ds.config import load_config
from dinov3ds.data.build import build_datasets
from dinov3ds.data.io import find_images, load_image
from dinov3ds.data.transforms import SegmentationEvalTransform, classification_eval_transform, denormalize
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import Backbone
from dinov3ds.models.hardware import resolve_device
from dinov3ds.models.tasks import Classifier, backbone_from_config
from dinov3ds.training.feature_cache import cached_features
from dinov3ds.viz import save_pca_image


class _Images(Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


def image_paths(inputs: list[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            paths += find_images(path)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path} does not exist; pass image files or folders")
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


@torch.inference_mode()
def features_of(backbone: Backbone, paths: list[Path], *, image_size: int = 224, batch_size: int = 16,
                num_workers: int = 2, patches: bool = True, progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """CLS [N,C] and pooled (patch mean) [N,C] float32, and optionally patch features [N,C,h,w] float16, of
    the images at `paths` resized (shorter side) and centre-cropped to `image_size`, on the CPU."""
    transform = classification_eval_transform(image_size, backbone.mean, backbone.std, crop_ratio=1.0)
    loader = DataLoader(_Images(paths, transform), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=backbone.device.type == "cuda")  # fmt: skip
    parts: dict[str, list[torch.Tensor]] = {"cls": [], "pooled": [], **({"patches": []} if patches else {})}
    for images in tqdm(loader, desc="features", disable=not progress):
        output = backbone(images)
        parts["cls"].append(output.cls.float().cpu())
        parts["pooled"].append(output.patches.float().mean(dim=(-2, -1)).cpu())
        if patches:
            parts["patches"].append(output.patches.half().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def extract_to_npz(backbone: Backbone, inputs: list[str | Path], out: Path, *, image_size: int = 224,
                   batch_size: int = 16, num_workers: int = 2, patches: bool = True,
                   overwrite: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """`features_of` every image, written to `out` (a .npz file; it must not exist unless `overwrite`)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: name the .npz file to write (or a folder for sharded features)")
    out = OutputFolder(out.parent, overwrite=overwrite).claim(out.name)
    paths = image_paths(inputs)
    tensors = features_of(backbone, paths, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                          patches=patches)  # fmt: skip
    arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
    arrays["paths"] = np.array([str(p) for p in paths])
    with open(out, "wb") as handle:  # np.savez would append .npz to a name without it
        np.savez(handle, **arrays)
    return arrays


@torch.inference_mode()
def pca_pictures(backbone: Backbone, inputs: list[str | Path], out_dir: Path, image_size: int = 448) -> list[Path]:
    """The classic DINO picture per image: the first three principal components of its patch features."""
    # The whole image, aspect kept: shorter side `image_size`, each side rounded to the patch size.
    transform = SegmentationEvalTransform(image_size, backbone.mean, backbone.std, multiple_of=backbone.input_multiple)
    written = []
    for path in image_paths(inputs):
        tensor, _ = transform(load_image(path))
        patches = backbone(tensor[None]).patches[0].float().cpu()
        target = out_dir / f"{path.stem}_pca.png"
        # the image as the model saw it, and beside it its PCA at that size
        save_pca_image(patches, target, image=denormalize(tensor, backbone.mean, backbone.std))
        written.append(target)
    return written


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(similarity / T)."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(features), chunk):
        queries = F.normalize(features[start : start + chunk].float(), dim=1)
        similarity, index = (queries @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_evaluate(backbone_name: str, root: str | Path, *, weights: str | None = None, image_size: int = 224,
                 k: int = 20, temperature: float = 0.07, pooling: str = "cls+avg",
                 overrides: dict | None = None, dtype: str = "float32", device: str = "auto",
                 backbone: Backbone | None = None) -> dict[str, float]:  # fmt: skip
    """k-NN top-1/top-5 on an image-folder dataset (train → val), features from the on-disk cache; also the
    k actually used (at most the number of training images). `backbone`: one already built (a fine-tuned
    checkpoint's) instead of `backbone_name` / `weights`."""
    if k < 1:
        raise UserError(f"--k {k}: the number of neighbours must be 1 or more")
    if not temperature > 0:
        raise UserError(f"--temperature {temperature}: it divides the similarities; use a value > 0, e.g. 0.07")
    config = load_config(None, [
        "task=classification", f"data.root={root}", f"data.image_size={image_size}", "data.augment=false",
        f"backbone.name={backbone_name}", f"head.pooling={pooling}", "data.num_workers=0", f"backbone.dtype={dtype}",
    ])  # fmt: skip
    config.backbone.weights = weights
    config.backbone.overrides = overrides or {}
    if backbone is None:
        backbone = backbone_from_config(config, resolve_device(device), inference=True)
    else:
        config.backbone.name = backbone.spec.name
    splits = build_datasets(config, backbone.mean, backbone.std)
    model = Classifier(backbone, len(splits.class_names), config, splits.class_names).to(backbone.device)
    train = cached_features(model, splits.train, config).tensors
    val = cached_features(model, splits.val, config).tensors
    used = min(k, len(train[0]))
    scores = knn_predict(train[0], train[1], val[0], len(splits.class_names), k=used, temperature=temperature)
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "top1": float((scores.argmax(1) == val[1]).float().mean()),
        "top5": float((top5 == val[1][:, None]).any(1).float().mean()),
        "k": used,
    }
