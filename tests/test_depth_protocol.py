"""DINOv3's NYU depth protocol (issue 36): the linear depth head without the CLS token (`head.cls_token: false`,
Meta's config-nyu.yaml decoder_head.use_cls_token False) beside DINOv2's with it, counted by hand; checkpoints with
and without the key reload as trained and export; the bundled NYU configs carry Meta's numbers; the training crop
is height x width after NYU's fixed box, as Meta's transforms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.data.depth import DepthTrainTransform, nyu_box
from dinov3ds.data.synthetic import make_depth_folder
from dinov3ds.errors import UserError
from dinov3ds.models.checkpoints import FORMAT_VERSION
from dinov3ds.models.depth import DepthEstimator
from dinov3ds.models.tasks import backbone_from_config
from dinov3ds.training.trainer import check_before_start
from tests.conftest import tiny

WIDTH, BINS = 384, 256  # vits16's width; the bins of both protocols


def depth_model(*extra: str, blocks: int = 1) -> DepthEstimator:
    """A tiny vits16 depth model whose linear head predicts a depth that varies (a fresh head is near constant)."""
    config = load_config(None, [*tiny(depth=blocks), "task=depth", *extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RANDOM WEIGHTS
        model = DepthEstimator(backbone_from_config(config), 1, config, ["depth"]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def head_parameters(model: DepthEstimator) -> int:
    return sum(p.numel() for p in model.head.parameters())


def test_the_linear_head_without_cls_token_reads_the_patches_alone():
    model = depth_model("head.cls_token=false")
    # BatchNorm over 384 channels (weight + bias) and a 1x1 conv 384 -> 256 bins (weights + bias), by hand:
    assert model.head.norm.num_features == WIDTH and model.head.classifier.in_channels == WIDTH
    assert head_parameters(model) == 2 * 384 + 384 * 256 + 256 == 99_328
    maps = model.features(torch.zeros(2, 3, 32, 48))
    assert [tuple(m.shape) for m in maps] == [(2, WIDTH, 2, 3)]
    assert model(torch.zeros(2, 3, 32, 48)).shape == (2, 1, 32, 48)


def test_the_linear_head_with_cls_token_on_the_last_4_blocks_is_dinov2s_linear4():
    model = depth_model("head.last_blocks=4", blocks=4)  # head.cls_token defaults to true, as before the key
    assert model.config.head.cls_token and model.layers == [0, 1, 2, 3]
    assert model.head.norm.num_features == WIDTH * 2 * 4 == 3072
    assert head_parameters(model) == 2 * 3072 + 3072 * 256 + 256 == 792_832
    patches, cls = model.backbone.get_intermediate_layers(torch.zeros(1, 3, 32, 32), [3], norm=True)[0]
    last = model.features(torch.zeros(1, 3, 32, 32))[-1]  # [patches, CLS broadcast] of the last tap
    torch.testing.assert_close(last[:, WIDTH:], cls[:, :, None, None].expand_as(patches).float())


def save_checkpoint(model: DepthEstimator, path: Path, drop_cls_key: bool = False) -> Path:
    """The head-only checkpoint depth training writes (as tests/test_depth_deploy.py); `drop_cls_key` writes the
    config as checkpoints from before `head.cls_token` hold it."""
    config = model.config.model_dump(mode="json")
    if drop_cls_key:
        del config["head"]["cls_token"]
    state = {f"model.head.{key}": value for key, value in model.head.state_dict().items()}
    torch.save({"state_dict": state, "dinov3ds": {
        "format_version": FORMAT_VERSION, "task": "depth", "config": config, "class_names": ["depth"],
        "num_classes": 1, "backbone": model.backbone.identity}}, path)  # fmt: skip
    return path


def test_a_checkpoint_without_cls_token_reloads_and_predicts_the_same(tmp_path):
    model = depth_model("head.cls_token=false")
    path = save_checkpoint(model, tmp_path / "dinov3.ckpt")
    reloaded = DepthEstimator.from_checkpoint(path, device="cpu")
    assert not reloaded.config.head.cls_token and reloaded.head.norm.num_features == WIDTH
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(images), reloaded(images)
    assert expected.std() > 0.01  # the depth varies: the comparison compares something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="'head.cls_token' is fixed by the trained head"):
        DepthEstimator.from_checkpoint(path, device="cpu", overrides=["head.cls_token=true"])


def test_a_run_trained_without_cls_token_evaluates_as_it_validated(tmp_path, capsys):
    root = make_depth_folder(tmp_path / "scenes", train=4, val=2)
    (tmp_path / "depth.yaml").write_text("task: depth\nhead: {cls_token: false}\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "depth.yaml"), *tiny(
        "data.dataset=depth_folder", f"data.root={root}", f"output_dir={run}", "data.batch_size=4", "optim.lr=1e-2",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.logger=[csv]")]) == 0  # fmt: skip
    best = run / "checkpoints" / "best.ckpt"
    reloaded = DepthEstimator.from_checkpoint(best, device="cpu")
    assert not reloaded.config.head.cls_token and head_parameters(reloaded) == 99_328
    assert main(["eval", "--checkpoint", str(best), "--out", str(tmp_path / "eval")]) == 0
    validated = json.loads((run / "val_metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert evaluated["RMSE"] == pytest.approx(validated["RMSE"], rel=1e-5), capsys.readouterr().err


def test_a_checkpoint_from_before_the_key_keeps_the_cls_token(tmp_path):
    model = depth_model()  # the old behaviour: CLS beside each patch
    path = save_checkpoint(model, tmp_path / "old.ckpt", drop_cls_key=True)
    reloaded = DepthEstimator.from_checkpoint(path, device="cpu")
    assert reloaded.config.head.cls_token and reloaded.head.norm.num_features == 2 * WIDTH
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls_token", ["true", "false"])
def test_both_linear_heads_export_to_onnx_metres(tmp_path, cls_token):
    pytest.importorskip("onnxruntime")
    from dinov3ds.deploy.onnx_export import export_onnx
    from dinov3ds.deploy.runtime import OnnxModel

    model = depth_model(f"head.cls_token={cls_token}", "depth.bins=64")
    result = export_onnx(model, tmp_path / "depth.onnx")
    assert all(p.range_fraction <= 1e-5 for p in result.parity), result.parity  # 0.1 mm at 10 m
    batch = np.random.default_rng(0).standard_normal((2, 3, 48, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(OnnxModel(result.path, "cpu").depth(batch), expected, atol=1e-4)


def test_the_bundled_nyu_configs_are_dinov3s_protocol():
    """The numbers of facebookresearch/dinov3 6876159 dinov3/eval/depth/configs/config-nyu.yaml (and the defaults
    it leaves in config.py / models/__init__.py), as the configs' comments cite them."""
    for name in ("depth_nyu_linear", "depth_nyu_dpt"):
        config = load_config(name)
        check_before_start(config)
        depth, optim, trainer = config.depth, config.optim, config.trainer
        assert (config.seed, config.data.batch_size * int(trainer.devices)) == (321, 16)  # seed; bs 2 x n_gpus 8
        assert (depth.min_depth, depth.max_depth, depth.bins, depth.bins_norm) == (0.001, 10.0, 256, "linear")
        assert (depth.train_crop, depth.train_fixed_crop, depth.eigen_crop) == ((416, 544), "nyu", True)
        assert (depth.silog_lambda, depth.silog_scale, depth.gradient_weight) == (0.85, 1.0, 0.0)  # SigLoss
        assert (optim.optimizer, optim.lr, optim.weight_decay, optim.warmup_steps) == ("adamw", 3e-4, 1e-4, 12800)
        assert optim.min_lr_ratio == pytest.approx(1 / 25 / 1000)  # div_factor 25, final_div_factor 1000
        assert (trainer.max_steps, trainer.gradient_clip_val, trainer.val_check_interval) == (38400, 35.0, 1600)
        assert config.inference.flip and config.data.eval_size is None  # use_tta; the whole frame
    linear = load_config("depth_nyu_linear").head
    assert (linear.name, linear.last_blocks, linear.cls_token) == ("linear", 1, False)  # LAST, use_cls_token False
    dpt = load_config("depth_nyu_dpt").head  # hub/depthers.py: channels 512, post_process_channels [1024] x 4
    assert dpt.options == {"features": 512, "reassemble_channels": [1024, 1024, 1024, 1024]}


def test_the_training_crop_is_height_by_width_inside_nyus_box():
    assert nyu_box(480, 640) == (45, 472, 43, 608)  # Meta's NYUCrop box (x1, y1, x2, y2) = (43, 45, 608, 472)
    depth = np.full((480, 640), 9.0, np.float32)  # the white border: 9 m
    depth[45:472, 43:608] = 2.0  # the picture: 2 m
    image = Image.fromarray(np.zeros((480, 640, 3), np.uint8))
    torch.manual_seed(0)
    boxed = DepthTrainTransform((416, 544), (0.5,) * 3, (0.5,) * 3, fixed_crop="nyu")
    whole = DepthTrainTransform((416, 544), (0.5,) * 3, (0.5,) * 3)
    for _ in range(8):
        picture, target = boxed(image, depth)
        assert picture.shape == (3, 416, 544) and target.shape == (416, 544)
        assert bool((target == 2.0).all())  # only the box trains
    assert any(bool((whole(image, depth)[1] == 9.0).any()) for _ in range(8))  # without it, the border does
