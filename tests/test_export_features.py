"""The feature tools: features .npz, PCA picture, k-NN (export: tests/test_deploy.py)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dinov3ds.commands.features import extract_to_npz, knn_evaluate, knn_predict, pca_pictures
from dinov3ds.config import cache_dir
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.models.backbones import load_backbone


def test_features_npz_shapes_and_dtypes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40, 56, 3), 60 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    backbone = load_backbone("vits16", "random", depth=1)
    arrays = extract_to_npz(backbone, [folder], tmp_path / "feats.npz", image_size=32, num_workers=0)
    stored = np.load(tmp_path / "feats.npz")
    assert stored["cls"].shape == (3, 384) and stored["cls"].dtype == np.float32
    assert stored["pooled"].shape == (3, 384) and stored["pooled"].dtype == np.float32
    assert stored["patches"].shape == (3, 384, 2, 2) and stored["patches"].dtype == np.float16
    assert list(stored["paths"]) == [str(folder / f"{i}.png") for i in range(3)]
    np.testing.assert_allclose(stored["pooled"], stored["patches"].astype(np.float32).mean((-2, -1)), atol=1e-2)
    assert arrays["cls"].shape == stored["cls"].shape


def test_pca_picture_is_written_and_not_constant(tmp_path):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, 32:] = (255, 40, 0)
    image[16:48, 16:48, 2] = 255
    Image.fromarray(image).save(tmp_path / "shapes.png")
    backbone = load_backbone("vits16", "random", depth=1)
    [written] = pca_pictures(backbone, [tmp_path / "shapes.png"], tmp_path / "pca", image_size=64)
    picture = np.asarray(Image.open(written))
    assert picture.shape[:2] == (64, 128) and picture.std() > 10  # the image, then its PCA at its size


def test_knn_votes_follow_dinos_weighting():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_predict(train, labels, torch.tensor([[0.2, 1.0]]), num_classes=2, k=3, temperature=0.1)
    similarity = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(torch.tensor([0.2, 1.0]), dim=0)
    expected = torch.stack([(similarity[:2] / 0.1).exp().sum(), (similarity[2] / 0.1).exp()])
    torch.testing.assert_close(scores[0], expected)


def test_knn_accuracy_on_generated_data(tmp_path):
    root = make_classification_folder(tmp_path / "data", num_classes=10, train_per_class=10, val_per_class=4, size=32)
    for dtype in ("float32", "bfloat16"):  # bf16 features from their own cache entries, same quality
        result = knn_evaluate("vits16", root, weights="random", image_size=32, k=10, pooling="avg",
                              overrides={"depth": 1}, dtype=dtype)  # fmt: skip
        assert result["top1"] >= 0.9, (dtype, result)
    assert len(list((cache_dir() / "features").glob("*/index.json"))) == 4  # train + val for each dtype
