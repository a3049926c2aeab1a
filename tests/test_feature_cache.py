"""The feature store never hands back stale features: every input of the features is part of its key.

Each test edits one thing a user really changes between runs (an image file, the crop, `last_blocks`)
and checks that the stored features equal a fresh extraction, which itself equals `Classifier.features`.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.config import load_config
from dinov3ds.data.build import build_datasets
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Classifier
from dinov3ds.training.feature_cache import cached_features, extract_features, store_key, store_settings
from tests.conftest import tiny

TINY = tiny("data.augment=false", depth=2)


@pytest.fixture(scope="module")
def backbone():
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_backbone("vits16", "random", depth=2)


@pytest.fixture
def root(tmp_path):
    return make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=48)


def classifier_and_train_split(backbone, root, *overrides: str):
    config = load_config(None, [*TINY, f"data.root={root}", *overrides])
    splits = build_datasets(config, backbone.mean, backbone.std)
    return Classifier(backbone, len(splits.class_names), config, splits.class_names), splits.train, config


def assert_fresh(model, dataset, config) -> torch.Tensor:
    """The cache's answer equals a direct extraction of the current files with the current settings."""
    cached = cached_features(model, dataset, config).tensors[0]
    fresh, _ = extract_features(model, dataset, config)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    return cached


def repaint(path, seed: int, uncompressed: bool = False) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    # An uncompressed PNG's size depends only on its dimensions: new content, same byte count.
    Image.fromarray(pixels).save(path, format="PNG", compress_level=0 if uncompressed else 6)


def test_edited_image_of_the_same_size_is_recomputed_by_its_mtime(backbone, root):
    model, dataset, config = classifier_and_train_split(backbone, root)
    path = dataset.samples[0][0]
    repaint(path, seed=1, uncompressed=True)
    before = assert_fresh(model, dataset, config)
    stat = os.stat(path)
    repaint(path, seed=2, uncompressed=True)
    assert os.stat(path).st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = assert_fresh(model, dataset, config)
    assert not torch.equal(before[0], after[0])


def test_edited_image_with_restored_mtime_is_recomputed_by_its_size(backbone, root):
    """Tools like rsync -t or a restore from backup keep the old mtime: the size must still tell."""
    model, dataset, config = classifier_and_train_split(backbone, root)
    before = assert_fresh(model, dataset, config)
    path = dataset.samples[0][0]
    stat = os.stat(path)
    repaint(path, seed=2)
    assert os.stat(path).st_size != stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old timestamp, new content
    after = assert_fresh(model, dataset, config)
    assert not torch.equal(before[0], after[0])


def test_the_same_settings_give_the_same_key_across_runs(backbone, root):
    """The key is made of text: an object's address (a transform without __repr__) made every process,
    every torchrun rank included, look for its own store."""
    keys = {store_key(store_settings(*classifier_and_train_split(backbone, root))) for _ in range(2)}
    assert len(keys) == 1
    settings = store_settings(*classifier_and_train_split(backbone, root))
    assert " at 0x" not in settings["transform"] and "size=32" in settings["transform"]


def test_changed_crop_is_recomputed(backbone, root):
    model, dataset, config = classifier_and_train_split(backbone, root, "data.image_size=32")
    small = assert_fresh(model, dataset, config)
    model, dataset, config = classifier_and_train_split(backbone, root, "data.image_size=48")
    large = assert_fresh(model, dataset, config)
    assert not torch.equal(small, large)


def test_changed_last_blocks_is_recomputed(backbone, root):
    """Same width per block (cls only, last 1 vs 2 blocks would differ in width), so only the key can tell."""
    model, dataset, config = classifier_and_train_split(backbone, root, "head.pooling=cls")
    last = assert_fresh(model, dataset, config)
    model.layers = [0]  # the first block's cls token: same shape as the last block's
    first = assert_fresh(model, dataset, config)
    assert last.shape == first.shape and not torch.equal(last, first)


def test_changed_pooling_is_recomputed(backbone, root):
    model, dataset, config = classifier_and_train_split(backbone, root, "head.pooling=cls")
    cls = assert_fresh(model, dataset, config)
    model, dataset, config = classifier_and_train_split(backbone, root, "head.pooling=avg")
    avg = assert_fresh(model, dataset, config)
    assert cls.shape == avg.shape and not torch.equal(cls, avg)


class CountingFeatures:
    """Wraps the backbone's tap extraction to count passes: a store hit makes none."""

    def __init__(self, model) -> None:
        self.calls, self.wrapped = 0, model.backbone.get_intermediate_layers
        model.backbone.get_intermediate_layers = self

    def __call__(self, images, *args, **kwargs):
        self.calls += 1
        return self.wrapped(images, *args, **kwargs)


def stores(cache) -> list:
    return sorted(p.parent for p in (cache / "features").glob("*/index.json"))


def test_stored_vectors_are_the_classifiers_features(backbone, root):
    """float32 storage: exactly `Classifier.features`; float16 (the default): the same rounded to half."""
    for pooling in ("cls", "avg", "cls+avg"):
        model, dataset, config = classifier_and_train_split(backbone, root, f"head.pooling={pooling}")
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            direct = model.features(images)
        model32, dataset32, config32 = classifier_and_train_split(backbone, root, f"head.pooling={pooling}",
                                                                  "cache.dtype=float32")  # fmt: skip
        torch.testing.assert_close(cached_features(model32, dataset32, config32).tensors[0], direct, rtol=0, atol=0)
        half = cached_features(model, dataset, config).tensors[0]
        expected = torch.cat([part.half().float() for part in direct.split(384, dim=1)], dim=1)
        torch.testing.assert_close(half, expected, rtol=0, atol=0)


def test_a_hit_returns_exactly_what_the_miss_stored_without_the_backbone(backbone, root, monkeypatch, tmp_path):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    model, dataset, config = classifier_and_train_split(backbone, root)
    counter = CountingFeatures(model)
    features, labels = cached_features(model, dataset, config).tensors
    passes = counter.calls
    assert passes > 0 and len(stores(tmp_path / "cache")) == 1
    again, again_labels = cached_features(model, dataset, config).tensors
    assert counter.calls == passes  # served from disk
    assert torch.equal(again, features) and torch.equal(again_labels, labels)
    assert labels.tolist() == [label for _, label in dataset.samples]


def test_moved_or_relabelled_data_is_recomputed(backbone, root, tmp_path):
    model, dataset, config = classifier_and_train_split(backbone, root)
    assert_fresh(model, dataset, config)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # copy2: same sizes and mtimes, another place
    moved_model, moved, moved_config = classifier_and_train_split(backbone, copy)
    counter = CountingFeatures(moved_model)
    cached_features(moved_model, moved, moved_config)
    assert counter.calls > 0
    dataset.samples = [(path, 1 - label) for path, label in dataset.samples]  # the class folders were swapped
    _, labels = cached_features(model, dataset, config).tensors
    assert labels.tolist() == [label for _, label in dataset.samples]


def test_a_dataset_without_a_file_list_cannot_be_cached(backbone, root):
    model, dataset, config = classifier_and_train_split(backbone, root)
    with pytest.raises(TypeError, match="TensorDataset has no 'samples' list to fingerprint"):
        cached_features(model, torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2)), config)


def test_a_run_that_fills_the_cache_trains_like_one_that_finds_it(tmp_path, monkeypatch):
    """Same config and seed: the first run (cache miss, features extracted) and the second (cache hit) train on
    identical features in identical order, so their heads are identical."""
    from dinov3ds.training.trainer import train

    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2, size=32)
    heads = []
    for run in ("first", "second"):
        config = load_config(None, [*TINY, f"data.root={root}", "trainer.max_epochs=3", "data.batch_size=4",
                                    "optim.lr_grid=[0.001,0.1]", f"output_dir={tmp_path / run}"])  # fmt: skip
        heads.append(torch.load(train(config).last_checkpoint, weights_only=True)["state_dict"])
    assert heads[0].keys() == heads[1].keys()
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key]), key


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file if the pickle is ever run


@pytest.mark.parametrize("content", ["pickle", "truncated", "wrong", "index"])
def test_a_poisoned_or_broken_store_is_rebuilt_never_run(backbone, root, tmp_path, monkeypatch, content):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    model, dataset, config = classifier_and_train_split(backbone, root)
    features = cached_features(model, dataset, config).tensors[0]
    [store] = stores(tmp_path / "cache")
    shard = store / "shard-00000.safetensors"
    marker = tmp_path / "payload-ran"
    if content == "pickle":
        torch.save({"features": Payload(marker), "labels": torch.zeros(2)}, shard)
    elif content == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif content == "wrong":
        from safetensors.torch import save_file

        save_file({"cls": torch.zeros(3, 2, 5), "mean": torch.zeros(3, 5), "labels": torch.zeros(3)}, str(shard))
    else:
        (store / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="incomplete, corrupt or from another version; extracting again"):
        again = cached_features(model, dataset, config).tensors[0]
    assert not marker.exists() and torch.equal(again, features)


def test_the_backbone_dtype_is_part_of_the_key(backbone, root, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    model, dataset, config = classifier_and_train_split(backbone, root)
    cached_features(model, dataset, config)
    half = load_backbone("vits16", "random", depth=2, dtype=torch.bfloat16)
    model, dataset, config = classifier_and_train_split(half, root)
    cached_features(model, dataset, config)
    assert len(stores(tmp_path / "cache")) == 2


def test_stored_blocks_are_the_last_four_and_any_the_model_reads(backbone, root):
    from dinov3ds.training.feature_cache import stored_blocks

    deep = load_backbone("vits16", "random", depth=6)
    model, _, _ = classifier_and_train_split(deep, root, "head.pooling=cls")
    assert stored_blocks(model) == [2, 3, 4, 5]
    model.layers = [0]
    assert stored_blocks(model) == [0, 2, 3, 4, 5]
    shallow, _, _ = classifier_and_train_split(backbone, root)
    assert stored_blocks(shallow) == [0, 1]  # a 2-block model keeps both


def test_batches_read_from_the_store_equal_its_rows(backbone, root, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    model, dataset, config = classifier_and_train_split(backbone, root)
    store = cached_features(model, dataset, config)
    rows = [store[i] for i in (3, 0, 2)]
    batch = store.__getitems__([3, 0, 2])
    assert len(batch) == 3
    for (features, label), (expected, expected_label) in zip(batch, rows):
        assert torch.equal(features, expected) and torch.equal(label, expected_label)
    [(features, labels)] = list(torch.utils.data.DataLoader(store, batch_size=len(store)))
    assert torch.equal(features, store.tensors[0]) and torch.equal(labels, store.tensors[1])
