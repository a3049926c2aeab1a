"""`dinov3ds demo`: the whole product on generated data, in a few minutes on a laptop CPU.

Uses Meta's weights when the official file is in checkpoints/, else random weights (said loudly: the
numbers then show the pipeline works, not what DINOv3 can do).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dinov3ds.config import load_config
from dinov3ds.data.io import load_image
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.data.transforms import classification_eval_transform, denormalize
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Segmenter
from dinov3ds.models.variants import get_spec
from dinov3ds.models.weights.sources import find_weight_file
from dinov3ds.training.trainer import train
from dinov3ds.viz import default_palette, save_color_png, save_pca_image

logger = logging.getLogger("dinov3ds")

BANNER = "=" * 78


def _weights_for(name: str) -> str:
    spec = get_spec(name)
    found = find_weight_file(spec)
    if found is not None:
        logger.info("using Meta's weights: %s", found)
        return str(found)
    logger.warning(
        "%s\nNO OFFICIAL WEIGHTS FOUND (%s): the demo runs with RANDOM weights.\n"
        "Results show the pipeline works, not DINOv3's quality. Put the file in checkpoints/ for real features.\n%s",
        BANNER, spec.weight_file, BANNER,
    )  # fmt: skip
    return "random"


def run_demo(out: Path, backbone: str = "vits16", quick: bool = False) -> None:
    """Generate data, save a PCA picture, train a classifier and a segmenter, write their pictures."""
    weights = _weights_for(backbone)
    data = out / "data"
    size = 64
    common = [
        f"backbone.name={backbone}", f"backbone.weights={weights}", "data.num_workers=0", "trainer.progress_bar=false",
        f"data.image_size={size}",
    ]  # fmt: skip

    classification_root = make_classification_folder(
        data / "classification", train_per_class=8 if quick else 16, val_per_class=4 if quick else 8, size=size
    )
    model = load_backbone(backbone, weights)
    first = sorted((classification_root / "val").rglob("*.JPEG"))[0]
    image = classification_eval_transform(size * 2, model.mean, model.std)(load_image(first))
    with torch.inference_mode():  # the image and its PCA side by side, at the image's size
        save_pca_image(model(image[None]).patches[0], out / "pca.png", image=denormalize(image, model.mean, model.std))
    logger.info("wrote %s", out / "pca.png")

    classification = train(load_config(None, [
        *common, "task=classification", "data.dataset=imagenette", f"data.root={classification_root}", "data.augment=false",
        f"trainer.max_epochs={10 if quick else 30}", "optim.lr=0.01", "data.batch_size=32",
        f"output_dir={out / 'classification'}",
    ]))  # fmt: skip
    logger.info("classification top-1: %.3f", classification.metrics.get("val/top1", float("nan")))

    segmentation_root = make_segmentation_folder(
        data / "segmentation", num_classes=4, train=16 if quick else 32, val=4 if quick else 8, size=(size, size)
    )
    segmentation = train(load_config(None, [
        *common, "task=segmentation", f"data.root={segmentation_root}", "head.name=unet_sum",
        "data.class_names=[background,circle,rectangle,triangle]", "loss.name=ce+dice", "data.batch_size=8",
        f"trainer.max_epochs={15 if quick else 25}", "optim.lr=0.003", "optim.weight_decay=0.0001",
        "data.scale_range=[0.75,1.5]", f"output_dir={out / 'segmentation'}",
    ]))  # fmt: skip
    logger.info("segmentation mIoU: %.3f", segmentation.metrics.get("val/mIoU", float("nan")))

    segmenter = Segmenter.from_checkpoint(segmentation.best_checkpoint)
    overlays = out / "segmentation" / "overlays"
    for path in sorted((segmentation_root / "images" / "val").glob("*.png"))[:4]:
        picture = load_image(path)
        labels = segmenter.predict(picture)
        save_color_png(labels, overlays / f"{path.stem}_overlay.png", default_palette(4), image=picture,
                       class_names=segmenter.class_names)
    print(f"demo finished: pictures and checkpoints in {out}; open {out / 'classification' / 'report.html'} and "
          f"{out / 'segmentation' / 'report.html'}")
