"""The linear-probe grid over pooling x last blocks x learning rate (DINOv3's linear evaluation): every head
sees what a lone head of its setting sees, trains as it would alone, and the winner is what the checkpoint
rebuilds."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dinov3ds.config import load_config
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import read_checkpoint
from dinov3ds.models.tasks import Classifier, backbone_from_config
from dinov3ds.training.probe_grid import ProbeGrid, ProbeSetting, input_config, probe_settings
from dinov3ds.training.trainer import train
from tests.conftest import tiny

TINY = tiny("data.augment=false", "data.batch_size=8", "trainer.log_every_n_steps=1", depth=4)
GRID = ["head.grid_last_blocks=[1,4]", "head.grid_pooling=[cls,cls+avg]", "optim.lr_grid=[0.003,0.3]"]


def test_settings_cover_the_grid_once_each():
    config = load_config(None, [*TINY, "head.grid_last_blocks=[1,4]", "head.grid_pooling=[cls,avg,cls+avg]",
                                "optim.lr_grid=[0.1,0.01]"])  # fmt: skip
    settings = probe_settings(config)
    # avg reads no CLS token: its two block counts are one head
    assert settings == [ProbeSetting(p, n, lr) for p, n in [("cls", 1), ("cls", 4), ("avg", 1)] for lr in (0.1, 0.01)] + [
        ProbeSetting("cls+avg", n, lr) for n in (1, 4) for lr in (0.1, 0.01)
    ]
    wide = input_config(config).head
    assert (wide.pooling, wide.last_blocks) == ("cls+avg", 4)
    # Only learning rates vary: the model is the configured one, and the metric names are the lr's alone.
    lr_only = load_config(None, [*TINY, "head.pooling=cls", "head.last_blocks=2", "optim.lr_grid=[0.1,0.01]"])
    assert input_config(lr_only) is lr_only
    assert ProbeGrid(lr_only, 8, 3).tags == ["lr0.1", "lr0.01"]
    assert load_config(None, TINY).optim.lr_grid is None and probe_settings(load_config(None, TINY)) is None
    assert ProbeGrid(config, 8, 3).tags[:2] == ["cls_last1_lr0.1", "cls_last1_lr0.01"]


@torch.no_grad()
def test_each_head_reads_what_a_classifier_of_its_setting_computes():
    config = load_config(None, [*TINY, "head.grid_last_blocks=[1,2,4]", "head.grid_pooling=[cls,avg,cls+avg]"])
    backbone = backbone_from_config(config)
    wide = Classifier(backbone, 3, input_config(config), ["a", "b", "c"])
    grid = ProbeGrid(config, backbone.embed_dim, 3)
    images = torch.randn(2, 3, 32, 32)
    vector = wide.features(images)
    assert vector.shape[1] == 5 * backbone.embed_dim  # 4 CLS tokens, then the patch mean
    for setting, head in zip(grid.settings, grid.heads):
        alone = load_config(None, [*TINY, f"head.pooling={setting.pooling}", f"head.last_blocks={setting.last_blocks}"])
        lone = Classifier(backbone, 3, alone, ["a", "b", "c"])
        torch.testing.assert_close(vector.index_select(1, head.picked), lone.features(images), rtol=0, atol=0)
        # Same start as the lone head (seeded by size), and the same logits.
        assert torch.equal(head.linear.weight, lone.head.linear.weight)
        torch.testing.assert_close(head(vector), lone(images), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One grid run, and each of its heads trained alone with the same seed and steps (one feature store)."""
    folder = tmp_path_factory.mktemp("probe_grid")
    root = make_classification_folder(folder / "data", num_classes=4, train_per_class=8, val_per_class=6, size=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOV3DS_CACHE", str(folder / "cache"))
        common = [*TINY, f"data.root={root}", "trainer.max_epochs=3"]
        grid = train(load_config(None, [*common, *GRID, f"output_dir={folder / 'grid'}"]))
        alone = {}
        for setting in probe_settings(load_config(None, [*common, *GRID])):
            name = f"{setting.pooling}_{setting.last_blocks}_{setting.lr:g}"
            overrides = [f"head.pooling={setting.pooling}", f"head.last_blocks={setting.last_blocks}",
                         f"optim.lr={setting.lr}", f"output_dir={folder / name}"]  # fmt: skip
            alone[setting] = train(load_config(None, [*common, *overrides]))
    return root, grid, alone


def test_grid_heads_train_exactly_as_each_head_alone_and_the_best_is_kept(trained):
    _, grid, alone = trained
    state = torch.load(grid.last_checkpoint, weights_only=True)["state_dict"]
    config = load_config(None, [*TINY, *GRID])
    tags = ProbeGrid(config, 8, 4).tags
    scores = {}
    for index, (setting, run) in enumerate(alone.items()):
        lone = read_checkpoint(run.last_checkpoint).head_state_dict
        for key, value in lone.items():
            assert torch.equal(state[f"grid.heads.{index}.{key}"], value), (setting, key)
        scores[setting] = grid.metrics[f"val/top1_{tags[index]}"]
        assert scores[setting] == run.metrics["val/top1"], setting
    assert len(set(scores.values())) > 1  # the settings differ, so picking one means something
    winner = max(scores, key=scores.get)  # the first of the best, in grid order
    assert grid.metrics["val/top1"] == scores[winner]
    assert grid.metrics["val/best_lr"] == pytest.approx(winner.lr)
    assert grid.metrics["val/best_last_blocks"] == winner.last_blocks
    # The checkpoint is the winner's, as if trained alone: config, head weights.
    checkpoint = read_checkpoint(grid.last_checkpoint)
    assert (checkpoint.config["head"]["pooling"], checkpoint.config["head"]["last_blocks"]) == (winner.pooling, winner.last_blocks)
    assert (checkpoint.config["optim"]["lr"], checkpoint.config["optim"]["lr_grid"]) == (winner.lr, None)
    assert checkpoint.config["head"]["grid_pooling"] is None  # eval and predict rebuild one head, not the grid
    assert checkpoint.run_config["head"]["grid_pooling"] == ["cls", "cls+avg"]  # what --resume compares
    lone = read_checkpoint(alone[winner].last_checkpoint).head_state_dict
    assert checkpoint.head_state_dict.keys() == lone.keys()
    assert all(torch.equal(checkpoint.head_state_dict[k], lone[k]) for k in lone)


def test_the_winner_rebuilds_from_its_checkpoint_and_predicts_its_score(trained):
    root, grid, _ = trained
    classifier = Classifier.from_checkpoint(grid.last_checkpoint)
    head = read_checkpoint(grid.last_checkpoint).config["head"]
    assert classifier.pooling == head["pooling"]
    assert len(classifier.layers) == head["last_blocks"]
    images = sorted((root / "val").rglob("*.JPEG"))
    predictions = classifier.predict(images, topk=1)
    accuracy = sum(p["labels"][0] == image.parent.name for p, image in zip(predictions, images)) / len(images)
    assert accuracy == pytest.approx(grid.metrics["val/top1"], abs=1e-6)


def test_a_resumed_grid_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """The winner's head changes size between validations; resuming must rebuild it before loading, and the
    saved winner's pooling must not read as a changed setting."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=4, size=32)
    common = [*TINY, *GRID, f"data.root={root}", "optim.scheduler=constant"]
    whole = train(load_config(None, [*common, "trainer.max_epochs=3", f"output_dir={tmp_path / 'whole'}"]))
    split = [*common, f"output_dir={tmp_path / 'split'}"]
    train(load_config(None, [*split, "trainer.max_epochs=1"]))
    resumed = train(load_config(None, [*split, "trainer.max_epochs=3"]), resume=True)
    expected = torch.load(whole.last_checkpoint, weights_only=True)
    found = torch.load(resumed.last_checkpoint, weights_only=True)
    assert found["probe_grid_best"] == expected["probe_grid_best"]
    assert found["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(found["state_dict"][key], value), key
    # A different grid is a different run.
    with pytest.raises(UserError, match=r"--resume: head.grid_pooling is \['cls'\]"):
        train(load_config(None, [*split, "head.grid_pooling=[cls]", "trainer.max_epochs=4"]), resume=True)


def test_a_grid_is_for_classification_only(tmp_path):
    from dinov3ds.data.synthetic import make_segmentation_folder

    root = make_segmentation_folder(tmp_path / "data", num_classes=2, train=2, val=1, size=(32, 32))
    config = load_config(None, [*tiny(), "task=segmentation", f"data.root={root}", "data.num_classes=2",
                                "head.grid_pooling=[cls,cls+avg]", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(UserError, match="head.grid_pooling and head.grid_last_blocks are for classification"):
        train(config)
    with pytest.raises(UserError, match=r"head\.grid_pooling"):
        load_config(None, ["head.grid_pooling=[max]"])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_takes_each_head_alone(algorithm):
    """One norm over all heads would shrink a head's step because another head's gradient is large."""
    from dinov3ds.training.module import TaskModule
    from dinov3ds.training.trainer import build_model

    config = load_config(None, [*TINY, *GRID, "trainer.gradient_clip_val=1.0"])
    module = TaskModule(build_model(config, ["a", "b", "c"], backbone_from_config(config)), config, ["a", "b", "c"])
    optimizer = torch.optim.SGD(module.grid.parameter_groups(), lr=0.1)
    for scale, head in enumerate(module.grid.heads):
        size = sum(p.numel() for p in head.parameters())
        for parameter in head.parameters():  # gradient norm 0.5 for head 0, x4 for each next head
            parameter.grad = torch.full_like(parameter, 0.5 * 4**scale / size**0.5)
    expected = []
    for head in module.grid.heads:  # what clipping each head in a run of its own does
        grads = [p.grad.clone() for p in head.parameters()]
        total = torch.cat([g.flatten() for g in grads]).norm()
        expected.append([g * min(1.0, 1.0 / (total + 1e-6)) if algorithm == "norm" else g.clamp(-1, 1) for g in grads])
    module.configure_gradient_clipping(optimizer, 1.0, algorithm)
    for head, grads in zip(module.grid.heads, expected):
        for parameter, grad in zip(head.parameters(), grads):
            torch.testing.assert_close(parameter.grad, grad)
    if algorithm == "norm":  # head 0 is within the limit alone: untouched, though the grid's total norm is not
        size = sum(p.numel() for p in module.grid.heads[0].parameters())
        assert float(module.grid.heads[0].linear.weight.grad[0, 0]) == pytest.approx(0.5 / size**0.5)


def test_the_cli_names_the_winner_and_eval_rebuilds_it(tmp_path, monkeypatch, capsys):
    from dinov3ds.cli import main

    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=4, size=32)
    run, best = tmp_path / "run", tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert main(["train", *TINY, *GRID, f"data.root={root}", "trainer.max_epochs=2", f"output_dir={run}"]) == 0
    printed = capsys.readouterr().out
    head = read_checkpoint(best).config["head"]
    [line] = [line for line in printed.splitlines() if line.startswith("probe grid winner:")]
    assert line.startswith(f"probe grid winner: pooling {head['pooling']}, last {head['last_blocks']} block(s), lr ")
    [best_line] = [line for line in printed.splitlines() if line.startswith("best checkpoint:")]
    assert main(["eval", "--checkpoint", str(best), "--out", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert scores["top1"] == pytest.approx(float(re.search(r"val/top1=([0-9.]+)", best_line).group(1)), abs=1e-4)


def test_an_augmented_grid_reads_the_wide_vector_from_the_backbone(tmp_path, monkeypatch):
    """Meta's protocol augments, so nothing is stored: each batch's widest vector comes from the backbone."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2, size=32)
    result = train(load_config(None, [*TINY, *GRID, "data.augment=true", f"data.root={root}", "trainer.max_epochs=1",
                                      f"output_dir={tmp_path / 'run'}"]))  # fmt: skip
    tags = ProbeGrid(load_config(None, [*TINY, *GRID]), 8, 3).tags
    assert {f"val/top1_{tag}" for tag in tags} <= set(result.metrics)
    assert not (tmp_path / "cache").exists()
    classifier = Classifier.from_checkpoint(result.last_checkpoint)
    head = read_checkpoint(result.last_checkpoint).config["head"]
    assert (classifier.pooling, len(classifier.layers)) == (head["pooling"], head["last_blocks"])
