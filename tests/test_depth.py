"""Monocular depth (issue 36): metrics and SILog pinned against hand-computed values, depth folders' one-line
errors, and train → eval → predict on generated scenes whose depth is learnable (textured planes at known
distances, `make_depth_folder`), reaching an RMSE well below predicting the training mean."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data.depth import load_depth
from dinov3ds.data.synthetic import make_depth_folder
from dinov3ds.errors import UserError
from dinov3ds.heads.depth import bins_to_depth
from dinov3ds.metrics.depth import DepthMetric, image_metrics
from dinov3ds.training.depth_loss import DepthLoss
from tests.conftest import tiny

PREDICTION = torch.tensor([[1.0, 2.0], [4.0, 0.5]])
TRUTH = torch.tensor([[1.0, 4.0], [2.0, 0.0]])  # the last pixel is unknown (0): never scored
# By hand over the three valid pixels (g, p) = (1, 1), (4, 2), (2, 4): g - p = 0, 2, -2; ratios 1, 2, 2.
HAND = {"RMSE": math.sqrt(8 / 3), "RMSE_log": math.log(2) * math.sqrt(2 / 3), "AbsRel": (0 + 2 / 4 + 2 / 2) / 3,
        "SqRel": (0 + 4 / 4 + 4 / 2) / 3, "log10": 2 * math.log10(2) / 3, "d1": 1 / 3, "d2": 1 / 3, "d3": 1 / 3}  # fmt: skip


def test_metrics_match_hand_computed_values():
    result = image_metrics(PREDICTION, TRUTH, min_depth=1e-3, max_depth=10)
    for name, value in HAND.items():
        assert result[name] == pytest.approx(value, abs=1e-6), name


def test_set_metrics_average_images_and_pool_pixels():
    metric = DepthMetric(1e-3, 10)
    metric.update(PREDICTION[None], TRUTH[None])
    metric.update(torch.ones(1, 2, 2), torch.ones(1, 2, 2))  # a perfect image: RMSE 0
    result = metric.compute()
    assert result["RMSE"] == pytest.approx(HAND["RMSE"] / 2, abs=1e-6)  # the papers' mean over images
    assert result["all_RMSE"] == pytest.approx(math.sqrt(8 / 7), abs=1e-6)  # 8 over all 7 valid pixels
    assert result["images"] == 2 and result["per_image"].shape == (2, 8)


def test_depth_beyond_max_depth_is_not_scored():
    result = image_metrics(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 50.0]]), max_depth=10)
    assert result["RMSE"] == 0 and result["d1"] == 1


def test_silog_matches_hand_computed_value_and_ignores_invalid_pixels():
    loss = DepthLoss(10.0)(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[1.0, 1.0, 0.0]]]))
    # d = ln p - ln g = [0, ln 2]: 10 * sqrt(mean(d²) - 0.85 mean(d)²)
    assert float(loss) == pytest.approx(10 * math.log(2) * math.sqrt(0.5 - 0.85 / 4), abs=1e-5)


def test_bins_weighted_by_softmax_give_the_bin_centre():
    logits = torch.full((1, 5, 1, 1), -1e4)
    logits[0, 3] = 0  # all weight on the fourth of linspace(1, 9, 5) = 7
    assert float(bins_to_depth(logits, 1.0, 9.0)) == pytest.approx(7.0)


def test_depth_files_that_cannot_be_right_are_one_line_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(UserError, match="not 16-bit"):
        load_depth(tmp_path / "eight.png")
    np.save(tmp_path / "metres.npy", np.full((4, 4), 2.5, np.float32))
    assert load_depth(tmp_path / "metres.npy")[0, 0] == 2.5


def _train(tmp_path: Path, capsys, root: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    (tmp_path / "depth.yaml").write_text("task: depth\n")
    code = main(["train", "--config", str(tmp_path / "depth.yaml"), *tiny(
        "data.dataset=depth_folder", f"data.root={root}", f"output_dir={run}", "data.batch_size=8", "optim.lr=5e-2",
        "trainer.max_epochs=12", "trainer.check_val_every_n_epoch=12", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.logger=[csv]", *extra)])  # fmt: skip
    assert code in (0, None), capsys.readouterr()
    return run


def test_depth_trains_below_the_mean_predictor_and_every_command_takes_it(tmp_path, capsys):
    root = make_depth_folder(tmp_path / "scenes", train=16, val=4)
    run = _train(tmp_path, capsys, root)
    metrics = json.loads((run / "val_metrics.json").read_text())
    train_depths = np.concatenate([load_depth(p).ravel() for p in sorted((root / "train" / "depth").glob("*.png"))])
    mean = train_depths[train_depths > 0].mean()
    val_depths = np.concatenate([load_depth(p).ravel() for p in sorted((root / "val" / "depth").glob("*.png"))])
    baseline = float(np.sqrt(np.mean((val_depths[val_depths > 0] - mean) ** 2)))
    print(f"val RMSE {metrics['RMSE']:.3f} m vs {baseline:.3f} m predicting the training mean")
    assert metrics["RMSE"] < 0.6 * baseline, (metrics["RMSE"], baseline)
    assert (run / "val_per_image_depth.csv").read_text().count("\n") == 5

    best = run / "checkpoints" / "best.ckpt"
    assert main(["eval", "--checkpoint", str(best), "--out", str(tmp_path / "eval")]) in (0, None)
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert evaluated["RMSE"] == pytest.approx(metrics["RMSE"], rel=1e-4)

    assert main(["predict", "--checkpoint", str(best), str(root / "val" / "images"), "--out", str(tmp_path / "pred"),
                 "--labels", str(root / "val" / "depth")]) in (0, None)  # fmt: skip
    written = np.asarray(Image.open(tmp_path / "pred" / "000.png.depth.png"))
    assert written.dtype == np.uint16 and written.shape == (32, 32)
    assert (tmp_path / "pred" / "000.png.depth_color.png").is_file()
    scored = json.loads((tmp_path / "pred" / "depth_metrics.json").read_text())
    assert scored["RMSE"] == pytest.approx(metrics["RMSE"], abs=2e-3)  # millimetre rounding of the PNGs aside


def test_a_depth_map_of_another_size_is_one_line(tmp_path, capsys):
    root = make_depth_folder(tmp_path / "scenes", train=2, val=1)
    Image.fromarray(np.ones((8, 8), np.uint16)).save(root / "val" / "depth" / "000.png")
    (root / "train" / "depth" / "001.png").unlink()
    (tmp_path / "depth.yaml").write_text("task: depth\n")
    code = main(["train", "--config", str(tmp_path / "depth.yaml"),
                 *tiny("data.dataset=depth_folder", f"data.root={root}", f"output_dir={tmp_path / 'run'}")])  # fmt: skip
    assert code == 2
    assert "has no depth file" in capsys.readouterr().err
