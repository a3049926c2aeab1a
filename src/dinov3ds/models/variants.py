"""The official DINOv3 variants: one table of everything known about each, and where its weight file lives.

Per-variant facts (timm architecture, width, depth, default taps, mean/std, Meta's file name and hash) live
here and nowhere else, the way timm keeps a pretrained config per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dinov3ds.errors import UserError

Family = Literal["vit", "convnext"]

# Mean/std per pretraining dataset: satellite weights were trained on other statistics.
NORMALIZATION = {
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}

WEIGHTS_URL_ROOT = "https://dl.fbaipublicfiles.com/dinov3"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything dinov3ds knows about one official variant, in one place (the timm pretrained-cfg habit).

    Attributes:
        name: Meta's name, e.g. ``vits16`` (SAT-493M weights get a ``_sat493m`` suffix).
        family: ``vit`` or ``convnext``.
        timm_name: the timm architecture; the ``_qkvb`` names keep Meta's q/v biases.
        embed_dim: token width (ViT) or last-stage width (ConvNeXt).
        depth: transformer blocks (ViT) or stages (ConvNeXt, always 4).
        default_layers: 0-based taps, four even intervals as in Meta's evaluation code.
        dataset: pretraining data, selects mean/std.
        weight_file: Meta's file name; its 8 hex characters start the file's SHA-256.
        stage_dims: ConvNeXt channel width per stage.
        timm_kwargs: architecture arguments that timm has no registered name for.
    """

    name: str
    family: Family
    timm_name: str
    embed_dim: int
    depth: int
    default_layers: tuple[int, ...]
    dataset: str
    weight_file: str
    stage_dims: tuple[int, ...] = ()
    timm_kwargs: tuple[tuple[str, object], ...] = field(default_factory=tuple)

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALIZATION[self.dataset][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALIZATION[self.dataset][1]

    @property
    def patch_size(self) -> int:
        """Stride of the final feature map."""
        return 16 if self.family == "vit" else 32

    @property
    def input_multiple(self) -> int:
        """Inputs must be a multiple of this: ViT patches are 16; ConvNeXt floors odd sizes, 16 keeps maps aligned."""
        return 16

    @property
    def url(self) -> str:
        return f"{WEIGHTS_URL_ROOT}/{self.meta_arch}/{self.weight_file}"

    @property
    def meta_arch(self) -> str:
        """Meta's architecture name, e.g. ``dinov3_vits16`` or ``dinov3_convnext_tiny``."""
        return self.weight_file.split("_pretrain_")[0]

    @property
    def timm_hub_id(self) -> str | None:
        """timm's Hub repo for these weights (no access form), or None (timm has no ViT-L+)."""
        if self.timm_kwargs:
            return None
        tag = f"dinov3_{self.dataset}" if self.family == "convnext" else self.dataset
        return f"timm/{self.timm_name}.{tag}"

    @property
    def transformers_hub_id(self) -> str:
        """Meta's gated transformers repo, e.g. ``facebook/dinov3-vits16-pretrain-lvd1689m``."""
        arch = self.meta_arch.removeprefix("dinov3_").replace("_", "-")
        return f"facebook/dinov3-{arch}-pretrain-{self.dataset}"


def _vit(name, timm_name, dim, depth, layers, file, dataset="lvd1689m", **kwargs) -> BackboneSpec:
    return BackboneSpec(name, "vit", timm_name, dim, depth, layers, dataset, file, (), tuple(kwargs.items()))


def _convnext(size: str, dims: tuple[int, ...], file_hash: str) -> BackboneSpec:
    return BackboneSpec(
        f"convnext_{size}", "convnext", f"convnext_{size}", dims[-1], 4, (0, 1, 2, 3), "lvd1689m",
        f"dinov3_convnext_{size}_pretrain_lvd1689m-{file_hash}.pth", dims,
    )  # fmt: skip


VARIANTS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _vit("vits16", "vit_small_patch16_dinov3_qkvb", 384, 12, (2, 5, 8, 11),
             "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
        _vit("vits16plus", "vit_small_plus_patch16_dinov3_qkvb", 384, 12, (2, 5, 8, 11),
             "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
        _vit("vitb16", "vit_base_patch16_dinov3_qkvb", 768, 12, (2, 5, 8, 11),
             "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
        _vit("vitl16", "vit_large_patch16_dinov3_qkvb", 1024, 24, (4, 11, 17, 23),
             "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
        _vit("vitl16_sat493m", "vit_large_patch16_dinov3_qkvb", 1024, 24, (4, 11, 17, 23),
             "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", dataset="sat493m"),
        # timm registers no ViT-L+ name: ViT-L with SwiGLU (hidden 4096 after alignment to 8) is exact.
        _vit("vitl16plus", "vit_large_patch16_dinov3_qkvb", 1024, 24, (4, 11, 17, 23),
             "dinov3_vitl16plus_pretrain_lvd1689m-46503df0.pth", swiglu_mlp=True, swiglu_align_to=8,
             mlp_ratio=6.0),
        _vit("vith16plus", "vit_huge_plus_patch16_dinov3_qkvb", 1280, 32, (7, 15, 23, 31),
             "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
        _vit("vit7b16", "vit_7b_patch16_dinov3", 4096, 40, (9, 19, 29, 39),
             "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
        _vit("vit7b16_sat493m", "vit_7b_patch16_dinov3", 4096, 40, (9, 19, 29, 39),
             "dinov3_vit7b16_pretrain_sat493m-a6675841.pth", dataset="sat493m"),
        _convnext("tiny", (96, 192, 384, 768), "21b726bb"),
        _convnext("small", (96, 192, 384, 768), "296db49d"),
        _convnext("base", (128, 256, 512, 1024), "801f2ba9"),
        _convnext("large", (192, 384, 768, 1536), "61fa432d"),
    )
}  # fmt: skip


def get_spec(name: str) -> BackboneSpec:
    """Look a variant up by Meta's name, with or without the ``dinov3_`` prefix."""
    key = name.lower().removeprefix("dinov3_").replace("-", "_")
    key = {"vitl16_sat": "vitl16_sat493m", "vit7b16_sat": "vit7b16_sat493m"}.get(key, key)
    if key not in VARIANTS:
        raise UserError(f"unknown backbone '{name}'; valid names: {', '.join(VARIANTS)}")
    return VARIANTS[key]
