"""The config tree: every numeric key has its range, paths are expanded, hostile YAML is refused, and each error
is one line naming the file or the override that caused it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.config.loading import MAX_YAML_NODES
from dinov3ds.errors import UserError


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", r"^override data\.batch_size=0: 'data\.batch_size': Input should be greater than or equal to 1"),
        ("optim.lr=-1", r"^override optim\.lr=-1: 'optim\.lr': Input should be greater than 0"),
        ("inference.stride=0", r"'inference\.stride': Input should be greater than or equal to 1"),
        ("data.image_size=" + "1" + "0" * 30, r"'data\.image_size': Input should be less than or equal to 16384"),
        ("data.image_size=8", r"'data\.image_size': Input should be greater than or equal to 16"),
        ("data.num_workers=-1", r"'data\.num_workers': Input should be greater than or equal to 0"),
        ("data.num_classes=" + "1" + "0" * 30, r"'data\.num_classes': Input should be less than or equal to 65536"),
        ("data.scale_range=[2,1]", r"'data\.scale_range': Value error, scale_range must be \[low, high\] with low <= high"),
        ("optim.lr_grid=[]", r"'optim\.lr_grid': List should have at least 1 item"),
        ("optim.lr_grid=[0.1,-1]", r"'optim\.lr_grid': Input should be greater than 0"),
        ("inference.scales=[]", r"'inference\.scales': List should have at least 1 item"),
        ("inference.volume_axis=3", r"'inference\.volume_axis': Input should be less than or equal to 2"),
        ("trainer.log_every_n_steps=0", r"'trainer\.log_every_n_steps'"),
        ("trainer.max_steps=-2", r"'trainer\.max_steps': Input should be greater than or equal to -1"),
        ("trainer.val_check_interval=1.5", r"'trainer\.val_check_interval'"),
        ("loss.label_smoothing=1", r"'loss\.label_smoothing': Input should be less than 1"),
        ("head.last_blocks=0", r"'head\.last_blocks': Input should be greater than or equal to 1"),
        ("seed=-3", r"'seed': Input should be greater than or equal to 0"),
        ("data.image_size=[32", r"^override data\.image_size=\[32 is not valid YAML: expected ',' or '\]'"),
        ("data.bogus=1", r"^override data\.bogus=1: unknown key 'data\.bogus'; allowed here: dataset, root"),
    ],
)  # fmt: skip
def test_a_bad_override_is_named_with_the_allowed_range(override, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(None, [override])
    assert "\n" not in str(error.value)


def test_an_error_in_the_file_names_the_file_not_an_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 0\n")
    with pytest.raises(UserError, match=rf"^{path}: 'data\.batch_size': Input should be greater than or equal to 1"):
        load_config(path, ["optim.lr=0.1"])


def test_home_and_variables_in_path_keys_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATASETS", str(tmp_path / "sets"))
    config = load_config(None, ["output_dir=~/runs/a", "data.root=$DATASETS/imagenette", "backbone.weights=~/w.pth"])
    assert config.output_dir == str(tmp_path / "home" / "runs" / "a")
    assert config.data.root == str(tmp_path / "sets" / "imagenette")
    assert config.backbone.weights == str(tmp_path / "home" / "w.pth")


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for name, previous in zip("bcdef", "abcde"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"bomb\.yaml: expands to more than {MAX_YAML_NODES} values through YAML aliases"):
        load_config(path)


def test_a_small_alias_is_fine(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("optim: &o {lr: 0.01, weight_decay: 0.0}\n")
    assert load_config(path).optim.lr == 0.01


def test_a_binary_file_as_config_is_one_line(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64) + b"\xff\xfe")
    with pytest.raises(UserError, match=r"weights\.bin is not a UTF-8 text file; pass a YAML config"):
        load_config(path)


def test_train_without_a_config_says_so(capsys):
    assert main(["train"]) == 2
    error = capsys.readouterr().err
    assert "train needs --config" in error and error.count("\n") == 1


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.task in ("classification", "segmentation", "depth")


def test_the_imagenet_protocol_config_is_metas_whole_grid() -> None:
    from dinov3ds.training.probe_grid import input_config, probe_settings

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "classification_imagenet_linear.yaml")
    settings = probe_settings(config)
    assert len(settings) == 2 * 2 * 13  # n_last_blocks {1, 4} x avgpool {off, on} x 13 learning rates
    assert {(s.pooling, s.last_blocks) for s in settings} == {("cls", 1), ("cls", 4), ("cls+avg", 1), ("cls+avg", 4)}
    assert (input_config(config).head.pooling, input_config(config).head.last_blocks) == ("cls+avg", 4)
