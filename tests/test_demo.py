"""`dinov3ds demo` runs end to end on generated data, says loudly that weights are random, writes its pictures."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dinov3ds.cli import main


def test_demo_quick_writes_its_outputs(tmp_path, caplog):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "RANDOM weights" in caplog.text  # no official weights in the isolated checkpoints folder
    for name in ["pca.png", "classification/curves.png", "classification/val_confusion_matrix.png",
                 "segmentation/curves.png", "segmentation/val_predictions.png",
                 "classification/checkpoints/best.ckpt", "segmentation/checkpoints/best.ckpt"]:  # fmt: skip
        assert (out / name).is_file(), name
    overlays = sorted((out / "segmentation" / "overlays").glob("*.png"))
    assert len(overlays) == 4
    pca = np.asarray(Image.open(out / "pca.png"))
    assert pca.std() > 5, "the PCA picture is flat"
    assert json.loads((out / "classification" / "val_metrics.json").read_text())["top1"] >= 0.7
    assert json.loads((out / "segmentation" / "val_metrics.json").read_text())["mIoU"] >= 0.6
