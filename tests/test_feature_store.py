"""The feature store at scale: extraction split over processes, resumed after a kill, fingerprints, and the
places it cannot be written. Edits that must invalidate it are in test_feature_cache.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinov3ds.config import load_config
from dinov3ds.data.build import build_datasets
from dinov3ds.data.feature_shards import write_shard
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Classifier
from dinov3ds.training import feature_cache
from dinov3ds.training.feature_cache import cached_features, extract_features
from tests.conftest import tiny

TINY = tiny("data.augment=false", "cache.shard_size=3", depth=2)


def model_and_split(root: Path, *overrides: str):
    config = load_config(None, [*TINY, f"data.root={root}", *overrides])
    backbone = load_backbone("vits16", "random", depth=2)
    splits = build_datasets(config, backbone.mean, backbone.std)
    return Classifier(backbone, len(splits.class_names), config, splits.class_names), splits.train, config


@pytest.fixture
def root(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):  # once, so the fixture's warning is expected
        load_backbone("vits16", "random", depth=1)
    return make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=5, val_per_class=1, size=32)


def shard_bytes(cache: Path) -> dict[str, bytes]:
    [store] = [p.parent for p in (cache / "features").glob("*/index.json")]
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard-*.safetensors"))}


def _rank(rank: int, world: int, root: str, cache: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "DINOV3DS_CACHE": cache,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"})  # fmt: skip
    torch.set_num_threads(1)
    model, dataset, config = model_and_split(Path(root))
    cached_features(model, dataset, config)


@pytest.mark.skipif(bool(os.environ.get("MUTANT_UNDER_TEST")), reason="30 s a mutant under mutmut; the in-process tests cover the store")
def test_two_processes_store_the_bytes_one_process_stores_each_sample_once(root, tmp_path, monkeypatch):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_rank, args=(rank, 2, str(root), str(tmp_path / "two"))) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    for process in processes:
        process.kill()  # one that hangs must not keep pytest waiting for it at exit
    assert [process.exitcode for process in processes] == [0, 0]
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "one"))
    model, dataset, config = model_and_split(root)
    cached_features(model, dataset, config)  # one process, here
    two, one = shard_bytes(tmp_path / "two"), shard_bytes(tmp_path / "one")
    assert list(two) == [f"shard-0000{i}.safetensors" for i in range(4)]  # 10 images, 3 per shard
    assert two == one
    from safetensors import safe_open

    paths = []
    for name in two:
        [store] = [p.parent for p in (tmp_path / "two" / "features").glob("*/index.json")]
        with safe_open(str(store / name), framework="pt") as handle:
            paths += __import__("json").loads(handle.metadata()["paths"])
    model, dataset, _ = model_and_split(root)
    assert paths == [str(path) for path, _ in dataset.samples]  # each sample exactly once, in order


def test_a_killed_extraction_resumes_from_its_shards_and_equals_an_uninterrupted_one(root, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "whole"))
    model, dataset, config = model_and_split(root)
    cached_features(model, dataset, config)
    whole = shard_bytes(tmp_path / "whole")

    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "killed"))
    written = []

    def dies_on_the_third(path, tensors, image_paths):
        if len(written) == 2:
            raise KeyboardInterrupt  # the kill, mid-extraction
        written.append(path.name)
        write_shard(path, tensors, image_paths)

    monkeypatch.setattr(feature_cache, "write_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        cached_features(model, dataset, config)
    monkeypatch.setattr(feature_cache, "write_shard", lambda *args: (written.append(args[0].name), write_shard(*args)))
    features = cached_features(model, dataset, config).tensors[0]
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors",  # before the kill
                       "shard-00002.safetensors", "shard-00003.safetensors"]  # after: only the missing ones  # fmt: skip
    assert shard_bytes(tmp_path / "killed") == whole
    torch.testing.assert_close(features, extract_features(model, dataset, config)[0], rtol=0, atol=0)


def test_content_fingerprint_sees_an_edit_that_keeps_size_and_mtime(root, tmp_path, monkeypatch):
    """`stat` trusts size and mtime (fast, documented); `content` hashes the bytes and notices."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    results = {}
    for mode in ("stat", "content"):
        model, dataset, config = model_and_split(root, f"cache.fingerprint={mode}")
        before = cached_features(model, dataset, config).tensors[0]
        path = Path(dataset.samples[0][0])
        stat = path.stat()
        shutil.copy(path, tmp_path / "original.png")
        flipped = Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        for quality in (90, 75, 50, 25, 10):  # no larger than the original, then padded to its size exactly
            flipped.save(path, format="JPEG", quality=quality)
            if path.stat().st_size <= stat.st_size:
                break
        with open(path, "ab") as handle:  # decoders stop at the end-of-image marker: the padding is never read
            handle.write(b"\0" * (stat.st_size - path.stat().st_size))
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        after = cached_features(model, dataset, config).tensors[0]
        results[mode] = torch.equal(before[0], after[0])
        shutil.copy(tmp_path / "original.png", path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert results["stat"]  # same size and mtime: stat mode keeps the stored features
    assert not results["content"]  # content mode extracts the edited image again


def test_a_store_that_cannot_be_written_trains_uncached_with_one_warning(root, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DINOV3DS_CACHE", str(blocked))
    model, dataset, config = model_and_split(root)
    with pytest.warns(UserWarning, match="cannot be written .* training without it"):
        features = cached_features(model, dataset, config).tensors[0]
    torch.testing.assert_close(features, extract_features(model, dataset, config)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("rank", "missing"), [(0, 1), (1, 0)])
def test_a_rank_the_folder_never_sees_is_a_one_line_error(root, tmp_path, monkeypatch, rank, missing):
    """Two nodes without a shared folder: rank 0 waits for rank 1's marker, and rank 1 for rank 0's (it
    waited forever, holding its launcher's pipes); each then names the folder in one line."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(feature_cache, "RANK_WAIT_S", 1.0)
    model, dataset, config = model_and_split(root)
    with pytest.raises(UserError, match=rf"rank\(s\) \[{missing}\] never appeared there.*DINOV3DS_CACHE") as error:
        cached_features(model, dataset, config)
    assert "\n" not in str(error.value)


def test_a_key_folder_with_another_stores_leftovers_is_started_afresh(root, tmp_path, monkeypatch):
    """A cache entry is replaced, never refused (`dinov3ds features --out` refuses such a folder instead)."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    model, dataset, config = model_and_split(root)
    settings = feature_cache.store_settings(model, dataset, config)
    folder = tmp_path / "cache" / "features" / feature_cache.store_key(settings)
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text('{"format": "dinov3ds-feature-store/1", "files": []}')
    write_shard(folder / "shard-00000.safetensors", {"cls": torch.ones(3, 4, 8), "mean": torch.ones(3, 8),
                                                     "labels": torch.zeros(3, dtype=torch.long)}, ["a", "b", "c"])  # fmt: skip
    (folder / "shard-00001.safetensors.99.tmp").write_bytes(b"half a shard")
    features = cached_features(model, dataset, config).tensors[0]
    torch.testing.assert_close(features, extract_features(model, dataset, config)[0], rtol=0, atol=0)
    assert not list(folder.glob("*.tmp"))
    assert json.loads((folder / "settings.json").read_text()) == settings
