"""The README's Python API example, run on generated data with a tiny random-weight backbone."""

from __future__ import annotations

import numpy as np
import torch

import dinov3ds
from dinov3ds.data.io import load_image
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from tests.conftest import tiny

TINY = tiny()


def test_python_api_classification_and_segmentation(tmp_path):
    backbone = dinov3ds.load_backbone("vits16", weights="random", depth=1)
    out = backbone(torch.zeros(2, 3, 32, 48))
    assert out.cls.shape == (2, 384) and out.patches.shape == (2, 384, 2, 3) and out.registers.shape == (2, 4, 384)
    taps = backbone.get_intermediate_layers(torch.zeros(1, 3, 32, 32), [0])
    assert taps[0][0].shape == (1, 384, 2, 2)

    root = make_classification_folder(tmp_path / "cls", num_classes=3, train_per_class=6, val_per_class=3, size=32)
    config = dinov3ds.load_config(None, [*TINY, f"data.root={root}", "data.image_size=32", "data.augment=false",
                                         "trainer.max_epochs=2", f"output_dir={tmp_path / 'run_cls'}"])  # fmt: skip
    result = dinov3ds.train(config)
    clf = dinov3ds.Classifier.from_checkpoint(result.best_checkpoint)
    image = sorted((root / "val").rglob("*.JPEG"))[0]
    [prediction] = clf.predict([image], topk=2)
    assert len(prediction["labels"]) == 2 and prediction["labels"][0] in clf.class_names
    assert 0 <= prediction["probabilities"][1] <= prediction["probabilities"][0] <= 1

    seg_root = make_segmentation_folder(tmp_path / "seg", num_classes=3, train=4, val=2, size=(32, 32))
    config = dinov3ds.load_config(None, [*TINY, "task=segmentation", f"data.root={seg_root}", "data.image_size=32",
                                         "data.class_names=[bg,a,b]", "head.name=segdino", "trainer.max_epochs=1",
                                         "data.batch_size=2", f"output_dir={tmp_path / 'run_seg'}"])  # fmt: skip
    result = dinov3ds.train(config)
    seg = dinov3ds.Segmenter.from_checkpoint(result.best_checkpoint)
    image_path = sorted((seg_root / "images" / "val").glob("*.png"))[0]
    labels, probabilities = seg.predict(image_path, mode="slide", return_probabilities=True)
    assert labels.shape == (32, 32) and probabilities.shape == (3, 32, 32)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)
    picture = dinov3ds.viz.overlay(np.asarray(load_image(image_path)), labels)
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
