"""dinov3ds: DINOv3 backbones as classifiers and segmenters for natural and medical images.

    import dinov3ds
    backbone = dinov3ds.load_backbone("vits16")            # official weights from checkpoints/
    result = dinov3ds.train("configs/classification_imagenette.yaml")
    clf = dinov3ds.Classifier.from_checkpoint(result.best_checkpoint)
"""

from importlib import import_module

__version__ = "0.1.0"

# Imported on first use: `import dinov3ds` stays fast and the CLI pays only for what a command needs.
_EXPORTS = {
    "load_backbone": "dinov3ds.models.backbones",
    "Backbone": "dinov3ds.models.backbones",
    "VARIANTS": "dinov3ds.models.variants",
    "Classifier": "dinov3ds.models.tasks",
    "Segmenter": "dinov3ds.models.tasks",
    "load_model": "dinov3ds.models.tasks",
    "train": "dinov3ds.training.trainer",
    "evaluate": "dinov3ds.commands.evaluate",
    "load_config": "dinov3ds.config",
    "Config": "dinov3ds.config",
    "UserError": "dinov3ds.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in ("viz", "metrics", "heads", "data", "inference", "volumes"):
        return import_module(f"dinov3ds.{name}")
    raise AttributeError(f"module 'dinov3ds' has no attribute {name!r}")
