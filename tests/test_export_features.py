"""Export (ONNX, TorchScript) against PyTorch, and the feature tools: features .npz, PCA picture, k-NN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.commands.export import export_onnx, export_torchscript
from dinov3ds.commands.features import extract_to_npz, knn_evaluate, knn_predict, pca_pictures
from dinov3ds.config import cache_dir, load_config
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import load_model
from dinov3ds.training.trainer import train
from tests.conftest import tiny

TINY = tiny("trainer.max_epochs=1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    cls_root = make_classification_folder(folder / "cls", num_classes=3, train_per_class=4, val_per_class=2, size=32)
    seg_root = make_segmentation_folder(folder / "seg", num_classes=3, train=4, val=2, size=(32, 32))
    classification = train(load_config(None, [*TINY, f"data.root={cls_root}", "data.augment=false",
                                              f"output_dir={folder / 'run_cls'}"]))  # fmt: skip
    segmentation = train(load_config(None, [*TINY, "task=segmentation", f"data.root={seg_root}", "head.name=unet_sum",
                                            "head.options={base_channels: 32}", "data.class_names=[a,b,c]",
                                            "data.batch_size=2", f"output_dir={folder / 'run_seg'}"]))  # fmt: skip
    return {"classification": classification.last_checkpoint, "segmentation": segmentation.last_checkpoint}


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_onnx_matches_pytorch(checkpoints, tmp_path, task, size):
    pytest.importorskip("onnxruntime")
    model = load_model(checkpoints[task])
    error = export_onnx(model, tmp_path / "model.onnx", *size, dynamic_batch=True)
    assert error <= 1e-4, f"{task} {size}: ONNX differs from PyTorch by {error}"


def test_torchscript_matches_pytorch(checkpoints, tmp_path):
    model = load_model(checkpoints["segmentation"])
    assert export_torchscript(model, tmp_path / "model.pt", 32, 48) <= 1e-4


def test_export_cli_prints_the_error(checkpoints, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "cls.onnx"
    assert main(["export", "--checkpoint", str(checkpoints["classification"]), "--out", str(out)]) == 0
    assert out.is_file() and "max abs error vs PyTorch" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(checkpoints["classification"]), "--out", str(out), "--height", "30"]) == 2


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
    assert picture.shape[:2] == (64, 64) and picture.std() > 10


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
