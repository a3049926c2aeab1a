"""How much of the backbone trains (`backbone.finetune`): nothing, the last blocks, LoRA / DoRA adapters
from peft on the blocks' linear layers, or everything.

Adapters are injected into the timm model in place (`peft.inject_adapter_in_model`), so parameter names stay
timm's plus `lora_A` / `lora_B` (timm's layer-wise decay still finds the block of each), and a checkpoint
holds exactly the parameters that trained. Targets are the layers inside the blocks only: a bare `proj`
never reaches `patch_embed.proj`.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import Tensor, nn

from dinov3ds.config import BackboneConfig
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import Backbone

ADAPTER_MODES = ("lora", "dora")


def target_layers(backbone: Backbone) -> dict[str, str]:
    """The adaptable layers of this variant: short name → its path inside a block."""
    if backbone.spec.family == "convnext":
        return {"fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    mlp = backbone.model.blocks[0].mlp
    ffn = ("fc1_g", "fc1_x", "fc2") if hasattr(mlp, "fc1_g") else ("fc1", "fc2")
    return {"qkv": "attn.qkv", "proj": "attn.proj", **{name: f"mlp.{name}" for name in ffn}}


def _targets(backbone: Backbone, section: BackboneConfig) -> list[str]:
    valid = target_layers(backbone)
    chosen = section.lora.targets if section.lora.targets is not None else list(valid)
    unknown = [name for name in chosen if name not in valid]
    if unknown or not chosen:
        raise UserError(
            f"backbone.lora.targets {unknown or chosen} are not layers of {backbone.spec.name}'s blocks; valid: "
            f"{', '.join(valid)}"
        )
    return chosen


def _block_prefix(backbone: Backbone) -> str:
    return r"stages\.\d+\.blocks\.\d+\." if backbone.spec.family == "convnext" else r"blocks\.\d+\."


def add_adapters(backbone: Backbone, section: BackboneConfig) -> str:
    """Inject LoRA / DoRA layers (untrained: they start as the identity) when the mode asks for them; returns
    what was done, for the start-up line. Used when training starts and when a checkpoint is rebuilt."""
    if section.finetune not in ADAPTER_MODES:
        return ""
    from peft import LoraConfig, inject_adapter_in_model

    targets = _targets(backbone, section)
    valid = target_layers(backbone)
    pattern = _block_prefix(backbone) + "(" + "|".join(re.escape(valid[name]) for name in targets) + ")"
    config = LoraConfig(r=section.lora.rank, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
                        target_modules=pattern, use_dora=section.finetune == "dora")  # fmt: skip
    inject_adapter_in_model(config, backbone.model)
    if "qkv" in targets:
        for block in backbone.model.blocks:
            # timm's attention with q/v biases calls F.linear on qkv.weight directly, past the adapter; with the
            # bias added separately it calls the (adapted) qkv module, with the same result.
            block.attn.qkv_bias_separate = True
    blocks = {match.group(0) for name, _ in backbone.model.named_modules() if (match := re.match(_block_prefix(backbone), name))}
    return f"{section.finetune} rank {section.lora.rank} on {', '.join(targets)} in {len(blocks)} blocks"


def make_trainable(backbone: Backbone, section: BackboneConfig) -> str:
    """Set what trains for `section.finetune` and say what it is; the backbone is frozen before this."""
    mode = section.finetune
    described = "frozen"
    if mode == "last_blocks":
        backbone.unfreeze_last_blocks(section.unfreeze_last_blocks)
        described = f"last {section.unfreeze_last_blocks} block(s)"
    elif mode == "full":
        backbone.requires_grad_(True)
        described = "all of it"
    elif mode in ADAPTER_MODES:
        described = add_adapters(backbone, section)
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_(".lora_" in name)
    backbone.trains = mode != "frozen"
    if section.grad_checkpointing and mode != "frozen":
        backbone.model.set_grad_checkpointing(True)
    return described


def load_trained_weights(backbone: Backbone, state_dict: dict[str, Tensor]) -> None:
    """Put what trained in the backbone (adapters, blocks, or all of it) back from a checkpoint, and mark the
    backbone's identity with their digest: features of a fine-tuned backbone never meet the frozen one's in
    the feature store."""
    if not state_dict:
        return
    missing_from_model = set(state_dict) - set(backbone.state_dict())
    if missing_from_model:
        raise UserError(f"checkpoint has backbone weights this backbone lacks: {sorted(missing_from_model)[:3]}")
    backbone.load_state_dict(state_dict, strict=False)
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    backbone.identity = {**backbone.identity, "finetuned_sha256": digest.hexdigest()}


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA / DoRA update into its base weight (peft's merge), for export; returns how many."""
    if not any(".lora_" in name for name, _ in model.named_parameters()):
        return 0
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.merge()
    return len(layers)


def trainable_counts(backbone: Backbone, trainable: int) -> tuple[int, int]:
    """(head and the rest, backbone) of `trainable` parameters: the start-up line shows both."""
    in_backbone = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return trainable - in_backbone, in_backbone
