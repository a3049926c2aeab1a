"""Fine-tuning the last blocks: their own learning rates, and checkpoints that carry them."""

from __future__ import annotations

import pytest
import torch

from dinov3ds.config import load_config
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.tasks import Classifier, backbone_from_config
from dinov3ds.training.module import TaskModule
from dinov3ds.training.trainer import build_model, train
from tests.conftest import tiny

TINY = tiny("data.augment=false", depth=3)


def test_layer_wise_learning_rates():
    config = load_config(None, [*TINY, "backbone.unfreeze_last_blocks=2", "optim.lr=0.1", "optim.backbone_lr=0.01",
                                "optim.layer_decay=0.5"])  # fmt: skip
    backbone = backbone_from_config(config)
    backbone.unfreeze_last_blocks(2)
    module = TaskModule(build_model(config, ["a", "b"], backbone), config, ["a", "b"])
    groups = module._parameter_groups()
    # timm's layer-wise decay: the last block and the final norm at backbone_lr, each earlier block 0.5 times the next
    assert sorted({g["lr"] for g in groups}, reverse=True) == [0.1, 0.01, 0.005]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in backbone.blocks[0].parameters())


def test_unfrozen_blocks_are_trained_saved_and_restored(tmp_path):
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=3, size=32)
    config = load_config(None, [*TINY, f"data.root={root}", "backbone.unfreeze_last_blocks=1", "trainer.max_epochs=2",
                                f"output_dir={tmp_path / 'run'}", "optim.backbone_lr=0.01"])  # fmt: skip
    result = train(config)
    checkpoint = read_checkpoint(result.last_checkpoint)
    saved_blocks = {key.split(".")[2] for key in checkpoint.backbone_state_dict if key.startswith("model.blocks.")}
    assert saved_blocks == {"2"}, "only the unfrozen block is stored"
    pristine = backbone_from_config(config)
    trained = Classifier.from_checkpoint(result.last_checkpoint)
    block = "model.blocks.2.mlp.fc1.weight"
    assert not torch.equal(trained.backbone.state_dict()[block], pristine.state_dict()[block]), "block 2 did not train"
    assert torch.equal(trained.backbone.state_dict()["model.blocks.0.mlp.fc1.weight"],
                       pristine.state_dict()["model.blocks.0.mlp.fc1.weight"])  # fmt: skip
    torch.testing.assert_close(trained.backbone.state_dict()[block], checkpoint.backbone_state_dict[block])


def test_out_of_range_unfreeze_is_a_user_error():
    from dinov3ds.errors import UserError

    backbone = backbone_from_config(load_config(None, TINY))
    with pytest.raises(UserError, match="unfreeze_last_blocks=5"):
        backbone.unfreeze_last_blocks(5)
