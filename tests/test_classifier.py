"""The linear classifier's input, built as DINOv3's linear evaluation builds it."""

from __future__ import annotations

import pytest
import torch

from dinov3ds.config import load_config
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Classifier
from tests.conftest import tiny


@pytest.fixture(scope="module")
def backbone():
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_backbone("vits16", "random", depth=4)


@pytest.mark.parametrize("pooling, last_blocks", [("cls", 1), ("cls", 4), ("avg", 1), ("cls+avg", 1), ("cls+avg", 4)])
def test_features_are_the_cls_of_the_last_blocks_then_the_last_blocks_patch_mean(backbone, pooling, last_blocks):
    config = load_config(None, tiny(f"head.pooling={pooling}", f"head.last_blocks={last_blocks}", depth=4))
    model = Classifier(backbone, 3, config, ["a", "b", "c"]).eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps = backbone.get_intermediate_layers(images, [0, 1, 2, 3], norm=True)
        expected = [cls for _, cls in taps[4 - last_blocks :]] if pooling != "avg" else []
        if pooling != "cls":
            expected.append(taps[-1][0].mean(dim=(-2, -1)))  # the last block's patches only
        features = model.features(images)
    torch.testing.assert_close(features, torch.cat(expected, dim=1), rtol=0, atol=0)
    cls_count = last_blocks if pooling != "avg" else 0
    assert model.feature_dim == features.shape[1] == 384 * (cls_count + (pooling != "cls"))  # 4 blocks cls+avg: 5 D


def test_patch_mean_over_several_blocks_is_refused(backbone):
    config = load_config(None, tiny("head.pooling=avg", "head.last_blocks=4", depth=4))
    with pytest.raises(UserError, match="head.last_blocks counts CLS tokens"):
        Classifier(backbone, 3, config, ["a", "b", "c"])


def test_the_linear_layer_starts_like_metas():
    config = load_config(None, tiny("head.pooling=cls+avg", "head.last_blocks=4", depth=4))
    torch.manual_seed(0)
    head = Classifier(load_backbone("vits16", "random", depth=4), 1000, config, [str(i) for i in range(1000)]).head
    assert abs(float(head.linear.weight.std()) - 0.01) < 0.0003 and torch.equal(head.linear.bias, torch.zeros(1000))
