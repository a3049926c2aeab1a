"""dinov3ds: DINOv3 backbones as classifiers and segmenters for natural and medical images.

    import dinov3ds
    backbone = dinov3ds.load_backbone("vits16")            # official weights from checkpoints/
    result = dinov3ds.train("classification_imagenette")     # a bundled config (dinov3ds configs lists them)
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


_SUBMODULES = ("config", "data", "heads", "metrics", "models", "report", "training", "viz")  # packages, imported on use


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return import_module(f"dinov3ds.{name}")
    raise AttributeError(f"module 'dinov3ds' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily imported names too, so dir() and tab completion show what the docs use."""
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
