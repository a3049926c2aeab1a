"""`backbone.finetune`: what trains (pinned counts per variant), that it trains, that checkpoints keep only it,
and that every command rebuilds the fine-tuned backbone from them."""

from __future__ import annotations

import logging

import pytest
import torch

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import Backbone
from dinov3ds.models.checkpoints import load_checkpoint_file, read_checkpoint
from dinov3ds.models.finetune import make_trainable, merge_adapters
from dinov3ds.models.tasks import Classifier, backbone_from_config
from dinov3ds.models.variants import get_spec
from dinov3ds.models.weights.streaming import empty_model
from dinov3ds.training.trainer import train
from tests.conftest import tiny

# Trainable backbone parameters with rank 8 on every block layer (DESIGN.md §11: ViT-S 589,824). For a layer
# of fan-in i and fan-out o LoRA adds r (i + o); DoRA adds o more (its magnitude vector).
COUNTS = {
    ("vits16", "lora"): 589_824, ("vits16", "dora"): 631_296,
    ("vits16plus", "lora"): 774_144, ("vitb16", "lora"): 1_179_648, ("vitl16", "lora"): 3_145_728,
    ("vitl16plus", "lora"): 5_308_416, ("vith16plus", "lora"): 6_881_280, ("vit7b16", "lora"): 19_660_800,
    ("convnext_tiny", "lora"): 529_920, ("convnext_large", "lora"): 2_165_760,
}  # fmt: skip


def _meta_backbone(name: str) -> Backbone:
    """The full-size architecture on the meta device: counting needs shapes only."""
    spec = get_spec(name)
    return Backbone(spec, empty_model(spec, {}), {})


@pytest.mark.parametrize("name, mode", COUNTS, ids=[f"{n}-{m}" for n, m in COUNTS])
def test_trainable_backbone_parameters_are_pinned(name, mode):
    backbone = _meta_backbone(name)
    make_trainable(backbone, load_config(None, [f"backbone.finetune={mode}"]).backbone)
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == COUNTS[name, mode]


def test_vits16_lora_is_rank_times_fan_in_plus_fan_out_on_four_layers_in_twelve_blocks():
    per_block = 8 * ((384 + 3 * 384) + (384 + 384) + (384 + 4 * 384) + (4 * 384 + 384))
    assert per_block * 12 == COUNTS["vits16", "lora"]


def test_targets_are_block_layers_only_and_a_wrong_name_lists_the_valid_ones():
    backbone = _meta_backbone("vits16")
    described = make_trainable(backbone, load_config(None, ["backbone.finetune=lora", "backbone.lora.targets=[proj]"]).backbone)
    assert described == "lora rank 8 on proj in 12 blocks"
    adapted = {name.rsplit(".lora_", 1)[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert adapted == {f"model.blocks.{i}.attn.proj" for i in range(12)}  # never patch_embed.proj
    with pytest.raises(UserError, match=r"\['fc1'\] are not layers of vits16plus's blocks; valid: qkv, proj, fc1_g, fc1_x, fc2"):
        make_trainable(_meta_backbone("vits16plus"), load_config(None, ["backbone.finetune=lora", "backbone.lora.targets=[fc1]"]).backbone)


@pytest.mark.parametrize("target", ["qkv", "proj", "fc1", "fc2"])
def test_every_adapted_layer_changes_its_module_output(target):
    """An adapter must sit on the path: timm's biased qkv is computed with F.linear on the weight unless told
    to add its bias separately, which would leave a qkv adapter without any effect. (Compared on the block's
    attention / MLP: random DINOv3 blocks are scaled by a tiny LayerScale.)"""
    config = load_config(None, [*tiny(depth=1), "backbone.finetune=lora", f"backbone.lora.targets=[{target}]"])
    backbone = backbone_from_config(config)
    block = backbone.model.blocks[0]
    module = block.mlp if target.startswith("fc") else block.attn
    tokens = torch.randn(1, 5, 384)
    with torch.no_grad():
        before = module(tokens)
        make_trainable(backbone, config.backbone)
        assert torch.allclose(module(tokens), before, atol=1e-5)  # LoRA starts as the identity
        for name, parameter in backbone.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(parameter, std=0.5)
        assert not torch.allclose(module(tokens), before, atol=1e-2), f"the {target} adapter is off the path"


def test_full_and_last_blocks_and_frozen():
    full = _meta_backbone("vits16")
    assert make_trainable(full, load_config(None, ["backbone.finetune=full"]).backbone) == "all of it"
    assert all(p.requires_grad for p in full.parameters()) and full.trains
    frozen = _meta_backbone("vits16")
    assert make_trainable(frozen, load_config(None, []).backbone) == "frozen"
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.train().training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classification_folder(tmp_path_factory.mktemp("ft") / "data", num_classes=2, train_per_class=4,
                                      val_per_class=2, size=32)  # fmt: skip


def _train(data, folder, *extra: str):
    # augment=true: the images go through the backbone each step (a fine-tuned backbone has no feature store)
    config = load_config(None, [*tiny("trainer.max_epochs=1", depth=2), f"data.root={data}", "data.batch_size=4",
                                "optim.lr=0.05", "optim.backbone_lr_scale=1.0", f"output_dir={folder}", *extra])  # fmt: skip
    return config, train(config)


def _features(model_or_backbone, images):
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    with torch.no_grad():
        return backbone(images).cls


def test_lora_trains_the_backbone_keeps_only_adapters_and_rebuilds_everywhere(data, tmp_path, caplog):
    images = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.INFO, logger="dinov3ds"):
        config, result = _train(data, tmp_path / "lora", "backbone.finetune=lora", "backbone.lora.rank=4")
    assert "trainable parameters: head 1,538, backbone 49,152 (lora rank 4 on qkv, proj, fc1, fc2 in 2 blocks)" in caplog.text
    assert "features are not cached (the backbone trains)" in caplog.text
    checkpoint = read_checkpoint(result.last_checkpoint)
    assert checkpoint.backbone_state_dict and all(".lora_" in key for key in checkpoint.backbone_state_dict)
    pristine = _features(backbone_from_config(config), images)
    trained = Classifier.from_checkpoint(result.last_checkpoint)
    assert not torch.allclose(_features(trained, images), pristine, atol=1e-4), "LoRA did not change the backbone"
    # eval, predict and export rebuild the adapters; export merges them and matches the unmerged model
    ckpt = str(result.last_checkpoint)
    assert main(["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "eval")]) == 0
    image = next(path for path in sorted(data.glob("val/*/*")) if path.is_file())
    assert main(["predict", "--checkpoint", ckpt, str(image), "--out", str(tmp_path / "pred")]) == 0
    assert main(["export", "--format", "torchscript", "--checkpoint", ckpt, "--out", str(tmp_path / "m.pt")]) == 0
    merged = Classifier.from_checkpoint(result.last_checkpoint)
    logits = merged(images)
    assert merge_adapters(merged) == 2 * 4 and torch.allclose(merged(images), logits, atol=1e-5)
    # the feature tools take the fine-tuned backbone from --checkpoint, and never share the frozen one's cache
    assert "finetuned_sha256" in trained.backbone.identity
    assert main(["pca", "--checkpoint", ckpt, str(image), "--out", str(tmp_path / "pca"), "--image-size", "32"]) == 0
    assert main(["knn", "--checkpoint", ckpt, "--root", str(data), "--k", "3", "--image-size", "32"]) == 0
    assert main(["features", "--checkpoint", ckpt, str(image), "--out", str(tmp_path / "f.npz"), "--image-size", "32",
                 "--workers", "0"]) == 0  # fmt: skip
    import numpy as np

    stored = np.load(tmp_path / "f.npz")["cls"]
    assert not np.allclose(stored, _features(backbone_from_config(config), trained.eval_transform()(
        __import__("dinov3ds.data.io", fromlist=["load_image"]).load_image(image))[None]).numpy(), atol=1e-4)


def test_frozen_training_leaves_the_backbone_untouched(data, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    config, result = _train(data, tmp_path / "frozen", "data.augment=true")
    assert not read_checkpoint(result.last_checkpoint).backbone_state_dict
    assert torch.equal(_features(Classifier.from_checkpoint(result.last_checkpoint), images),
                       _features(backbone_from_config(config), images))  # fmt: skip


def test_dora_and_full_on_convnext_train_and_resume(data, tmp_path):
    convnext = ["backbone.name=convnext_tiny", "backbone.overrides={depth: 1}"]
    for mode in ("dora", "full"):
        folder = tmp_path / mode
        config, first = _train(data, folder, *convnext, f"backbone.finetune={mode}")
        saved = read_checkpoint(first.last_checkpoint).backbone_state_dict
        assert saved and (mode == "full" or all(".lora_" in key for key in saved))
        resumed = train(config.model_copy(update={"trainer": config.trainer.model_copy(update={"max_epochs": 2})}),
                        resume=True)  # fmt: skip
        assert load_checkpoint_file(resumed.last_checkpoint)["epoch"] == 1  # the second epoch ran after resuming


def test_gradient_checkpointing_gives_the_same_gradients():
    config = load_config(None, [*tiny(depth=2), "backbone.finetune=lora"])
    gradients = []
    for checkpointing in (False, True):
        backbone = backbone_from_config(config)
        section = config.backbone.model_copy(update={"grad_checkpointing": checkpointing})
        make_trainable(backbone, section)
        torch.manual_seed(0)
        backbone(torch.randn(2, 3, 32, 32)).patches.square().mean().backward()
        gradients.append([p.grad.clone() for p in backbone.parameters() if p.requires_grad])
    assert backbone.model.grad_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*gradients))
