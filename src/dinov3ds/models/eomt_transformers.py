"""transformers' EoMT (`EomtDinov3ForUniversalSegmentation`) as a dinov3ds model: its backbone as timm's ViT,
its queries, mask and class heads as the `eomt` head.

A folder written by `save_pretrained` (or an `hf-hub:` id already in the Hub cache) reads like a dinov3ds
checkpoint (`checkpoint_dict`, which `models.checkpoints` calls for such a folder): a config (the variant, the
head's options, class names from `id2label`, the training size from `image_size`), the head's weights, and a
backbone identity naming the folder. Its backbone, trained with the queries, streams into timm's model through
the same key mapping as transformers' DINOv3 files (`folder_backbone`); mean and std come from the folder's
`preprocessor_config.json` (ImageNet's, transformers' default, without one). `head.weights=FOLDER` starts a
training run from one: the config must describe the folder's model (`start_from_folder` checks it and makes the
folder's backbone the run's), and the head starts from the folder's weights (`start_head`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from dinov3ds.config import Config, config_from_dict
from dinov3ds.errors import UserError
from dinov3ds.heads.eomt import EoMTHead
from dinov3ds.models.backbones import Backbone
from dinov3ds.models.variants import NORMALIZATION, VARIANTS, BackboneSpec, get_spec
from dinov3ds.models.weights import formats, hub, mapping, streaming
from dinov3ds.models.weights.files import TensorFile
from dinov3ds.models.weights.hashes import weights_digest

logger = logging.getLogger("dinov3ds")

MODEL_TYPE = "eomt_dinov3"
SOURCE = "transformers-eomt"  # the backbone identity's `source`
TIMM_ROPE_TEMPERATURE = 100.0  # timm's DINOv3 RoPE base (transformers' rope_theta)
# EomtDinov3Config's defaults, for keys a config.json leaves out
CONFIG_DEFAULTS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                   "num_queries": 200, "num_blocks": 4, "image_size": 640, "layer_norm_eps": 1e-6}  # fmt: skip
# transformers' head names → the eomt head's (tue-mps/eomt names them q, class_head, mask_head, upscale)
HEAD_RULES = (
    (r"^query\.weight$", "queries.weight"), (r"^class_predictor\.", "classifier."), (r"^attn_mask_probs$", "mask_probabilities"),
    (r"^mask_head\.fc1\.", "mask_mlp.0."), (r"^mask_head\.fc2\.", "mask_mlp.2."), (r"^mask_head\.fc3\.", "mask_mlp.4."),
    (r"^upscale_block\.block\.(\d+)\.conv1\.", r"upscale.\1.up."),
    (r"^upscale_block\.block\.(\d+)\.conv2\.", r"upscale.\1.depthwise."),
    (r"^upscale_block\.block\.(\d+)\.layernorm2d\.", r"upscale.\1.norm."),
)  # fmt: skip


def folder_of(weights: str | Path | None) -> Path | None:
    """The local folder when `weights` names a transformers EoMT-DINOv3 folder or a cached `hf-hub:` id of one."""
    if weights is None or str(weights) == "random":
        return None
    text = str(weights)
    if hub.is_hub_id(text):
        repo = text.removeprefix(hub.PREFIX)
        folder = hub.cached_snapshot(repo) if repo.count("/") == 1 else None
    else:
        folder = Path(text)
    if folder is None or not (folder / "config.json").is_file():
        return None
    kind = _settings(folder).get("model_type")
    if kind == "eomt":
        raise UserError(f"{weights} is EoMT on DINOv2; dinov3ds runs DINOv3 backbones: use an EoMT-DINOv3 model")
    return folder if kind == MODEL_TYPE else None


def _folder(weights: str | Path, key: str) -> Path:
    folder = folder_of(weights)
    if folder is None:
        raise UserError(f"{key}={weights} is not a transformers EoMT-DINOv3 folder (config.json with model_type "
                        f"{MODEL_TYPE}) or a Hub id of one in the cache; give the folder save_pretrained wrote")  # fmt: skip
    return folder


def _settings(folder: Path) -> dict:
    try:
        settings = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {folder / 'config.json'} ({error}); download the folder again") from None
    if not isinstance(settings, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object; download the folder again")
    return {**CONFIG_DEFAULTS, **settings}


def _backbone_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """transformers' DINOv3 name → the folder's, for the backbone's tensors (`layers.N` → `layer.N`, `layernorm` → `norm`)."""
    names = {}
    for key in shapes:
        if key.startswith("embeddings."):
            names[key] = key
        elif key.startswith(("layers.", "layernorm.")):
            names[key.replace("layers.", "layer.", 1).replace("layernorm.", "norm.", 1)] = key
    return names


def _fits(spec: BackboneSpec, overrides: dict, shapes: dict[str, tuple[int, ...]], heads: int) -> list[str]:
    """Why the folder's backbone does not fill `spec` with `overrides` exactly (empty when it does)."""
    model = streaming.empty_model(spec, overrides)
    targets = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    layout = formats.detect(shapes)
    if layout is None or layout.family != "vit":
        return ["no DINOv3 ViT backbone in the folder"]
    problems = mapping.mismatches(mapping.plan(shapes, layout, targets), shapes, targets)
    return problems or ([] if model.blocks[0].attn.num_heads == heads else [f"{heads} attention heads"])


def _architecture(settings: dict, shapes: dict[str, tuple[int, ...]], folder: Path) -> tuple[BackboneSpec, dict]:
    """The official variant the folder's backbone fills exactly, else ViT-S(+) resized by overrides."""
    if settings.get("patch_size", 16) != 16 or settings.get("num_channels", 3) != 3:
        raise UserError(f"{folder}: patch size {settings.get('patch_size')}, {settings.get('num_channels')} channels; "
                        "dinov3ds' ViTs take 16-pixel patches of RGB images")  # fmt: skip
    shapes = {name: shapes[key] for name, key in _backbone_names(shapes).items()}
    hidden, depth, heads = settings["hidden_size"], settings["num_hidden_layers"], settings["num_attention_heads"]
    rope = settings.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", settings.get("rope_theta", TIMM_ROPE_TEMPERATURE)))
    extra = {} if theta == TIMM_ROPE_TEMPERATURE else {"rope_temperature": theta}
    for spec in VARIANTS.values():
        if spec.family == "vit" and spec.dataset == "lvd1689m" and (spec.embed_dim, spec.depth) == (hidden, depth):
            if not _fits(spec, extra, shapes, heads):
                return spec, extra
    base = get_spec("vits16plus" if settings.get("use_gated_mlp") else "vits16")
    overrides = {"embed_dim": hidden, "depth": depth, "num_heads": heads,
                 "mlp_ratio": settings["intermediate_size"] / hidden, **extra}  # fmt: skip
    problems = _fits(base, overrides, shapes, heads)
    if problems:
        raise UserError(f"{folder}: its backbone fits no DINOv3 ViT dinov3ds builds (first mismatch: {problems[0]})")
    return base, overrides


def _head_state(tensors: TensorFile, settings: dict) -> dict[str, Tensor]:
    """The eomt head's weights, under its own names (masks on in every block if the folder has no probabilities)."""
    state = {"mask_probabilities": torch.ones(int(settings["num_blocks"]))}
    for key in tensors.shapes:
        for pattern, replacement in HEAD_RULES:
            if re.match(pattern, key):
                state[re.sub(pattern, replacement, key)] = tensors.read(key)
                break
    return state


def _normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from `preprocessor_config.json`, else transformers' EoMT default (ImageNet's)."""
    mean, std = NORMALIZATION["lvd1689m"]
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            processor = json.loads(path.read_text())
            mean, std = tuple(processor.get("image_mean", mean)), tuple(processor.get("image_std", std))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {path} ({error}); download the folder again") from None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _size(settings: dict) -> int:
    size = settings["image_size"]
    return int(min(size) if isinstance(size, (list, tuple)) else size)


def class_names(settings: dict) -> list[str]:
    """`id2label`'s names in id order."""
    labels = settings.get("id2label") or {}
    if not isinstance(labels, dict) or not all(str(key).isdigit() for key in labels):
        raise UserError("config.json: id2label must map class ids (0, 1, ...) to names; download the folder again")
    return [str(labels[key]) for key in sorted(labels, key=int)]


def checkpoint_dict(weights: str | Path) -> dict:
    """The folder as `torch.load` gives a dinov3ds segmentation checkpoint: metadata, config and head weights
    (the backbone comes from the folder again when the model is built: `folder_backbone`)."""
    folder = _folder(weights, "checkpoint")
    settings = _settings(folder)
    with TensorFile(folder) as tensors:
        spec, overrides = _architecture(settings, tensors.shapes, folder)
        head = _head_state(tensors, settings)
    names = class_names(settings)
    if "classifier.weight" not in head or head["classifier.weight"].shape[0] != len(names) + 1:
        raise UserError(f"{folder}: id2label names {len(names)} classes but the class layer has "
                        f"{head['classifier.weight'].shape[0] - 1 if 'classifier.weight' in head else 'no'} (+1 no-object)")  # fmt: skip
    size = _size(settings)
    config = config_from_dict({
        "task": "segmentation",
        "backbone": {"name": spec.name, "weights": str(weights), "overrides": overrides},
        "data": {"dataset": "segmentation_folder", "image_size": size, "eval_size": size, "class_names": names,
                 "num_classes": len(names)},
        "head": {"name": "eomt", "options": {"num_queries": settings["num_queries"], "num_blocks": settings["num_blocks"]}},
        "inference": {"mode": "slide", "crop": size, "stride": size},  # the reference: fewest windows of its size
    }, source=str(folder / "config.json"))  # fmt: skip
    identity = {"name": spec.name, "weights": str(weights), "source": SOURCE, "sha256": weights_digest(folder),
                "overrides": overrides}  # fmt: skip
    meta = {"task": "segmentation", "config": config.model_dump(mode="json"), "class_names": names,
            "num_classes": len(names), "backbone": identity}  # fmt: skip
    return {"dinov3ds": meta, "state_dict": {f"model.head.{name}": tensor for name, tensor in head.items()}}


def folder_backbone(name: str, weights: str | Path, overrides: dict, dtype: torch.dtype,
                    device: str | torch.device) -> Backbone:  # fmt: skip
    """The folder's backbone in timm's model for variant `name`, streamed in `dtype` onto `device`."""
    folder = _folder(weights, "backbone.weights")
    spec, settings = get_spec(name), _settings(folder)
    with TensorFile(folder) as tensors:
        names = _backbone_names(tensors.shapes)
        shapes = {new: tensors.shapes[old] for new, old in names.items()}
        model = streaming.empty_model(spec, overrides)
        targets = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        layout = formats.detect(shapes)
        problems = ["no DINOv3 ViT backbone"] if layout is None else mapping.mismatches(
            placements := mapping.plan(shapes, layout, targets), shapes, targets)  # fmt: skip
        if problems:
            raise UserError(f"{folder} does not fit backbone '{name}' (first mismatch: {problems[0]}); leave "
                            "backbone.name and backbone.overrides to the folder")  # fmt: skip
        streaming.fill(model, tensors, [replace(p, source=names[p.source]) for p in placements], dtype, device)
    for module in model.modules():  # transformers' EoMT config says its eps (1e-6 by default; timm's DINOv3: 1e-5)
        if isinstance(module, nn.LayerNorm):
            module.eps = float(settings["layer_norm_eps"])
    identity = {"name": spec.name, "weights": str(weights), "source": SOURCE, "sha256": weights_digest(folder),
                "overrides": overrides}  # fmt: skip
    backbone = Backbone(spec, model.to(device), identity)
    backbone.mean, backbone.std = _normalisation(folder)
    backbone.embed_dim = int(model.embed_dim)  # Backbone takes the variant's width; overrides may resize it
    return backbone


def start_from_folder(config: Config) -> None:
    """`head.weights` names a transformers EoMT folder to train on from: the config must describe its model (head
    eomt, the folder's variant and head shape; a one-line error names the value to set, so the config stays what
    the run was given), and the folder's backbone becomes `backbone.weights`."""
    weights = config.head.weights
    folder = _folder(weights, "head.weights")
    settings = _settings(folder)
    with TensorFile(folder) as tensors:
        spec, overrides = _architecture(settings, tensors.shapes, folder)
    options, defaults = config.head.options, EoMTHead.__init__.__kwdefaults__
    checks = {"head.name": (config.head.name, "eomt"), "backbone.name": (get_spec(config.backbone.name).name, spec.name),
              "backbone.overrides": (config.backbone.overrides, overrides),
              **{f"head.options.{key}": (options.get(key, defaults[key]), settings[key]) for key in ("num_queries", "num_blocks")},
              "backbone.weights": (config.backbone.weights or str(weights), str(weights))}  # fmt: skip
    for key, (given, wanted) in checks.items():
        if given != wanted:
            raise UserError(f"head.weights={weights} is EoMT on {spec.name}: set {key}={json.dumps(wanted)} (it is {json.dumps(given)})")
    config.backbone.weights = str(weights)


def start_head(head: nn.Module, weights: str | Path) -> None:
    """Fill the eomt head from the folder; the class layer only when it has the data's class count."""
    folder = _folder(weights, "head.weights")
    with TensorFile(folder) as tensors:
        state = _head_state(tensors, _settings(folder))
    own = head.state_dict()
    if state.get("classifier.weight") is not None and state["classifier.weight"].shape != own["classifier.weight"].shape:
        logger.info("head.weights: %d classes there, %d here: the class layer starts fresh",
                    state["classifier.weight"].shape[0] - 1, own["classifier.weight"].shape[0] - 1)  # fmt: skip
        state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("classifier.")]
    if missing or unexpected:
        raise UserError(f"head.weights={weights} does not fit the eomt head ({(missing or unexpected)[0]}); use the "
                        "folder as save_pretrained wrote it")  # fmt: skip
