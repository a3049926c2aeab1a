"""Weight-file utilities: where caches live, the SHA-256 cache, what a state dict holds, pickle refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dinov3ds.config import cache_dir
from dinov3ds.errors import UserError
from dinov3ds.models.weights.files import TensorFile, pickle_refusal_reason, weight_files
from dinov3ds.models.weights.formats import describe
from dinov3ds.models.weights.hashes import WeightFile, sha256_of, verify_hash, weights_digest


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Every tensor of a file or folder, read through the loader's one-at-a-time reader."""
    with TensorFile(path) as tensors:
        return {name: tensors.read(name).clone() for name in tensors.shapes}


def test_cache_dir_is_the_environment_variable_or_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DINOV3DS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dinov3ds"


def test_hash_cache_is_created_in_a_missing_nested_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "a" / "b" / "c"))
    data = tmp_path / "file.bin"
    data.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: several read chunks
    digest = sha256_of(data)
    assert digest == hashlib.sha256(data.read_bytes()).hexdigest()
    cached = json.loads((tmp_path / "a" / "b" / "c" / "sha256.json").read_text())
    assert list(cached.values()) == [digest]


def vit_state(depth: int, swiglu: bool) -> dict[str, torch.Tensor]:
    state = {"cls_token": torch.zeros(1, 1, 24), "storage_tokens": torch.zeros(1, 4, 24)}
    for block in range(depth):
        names = ("w1", "w2", "w3") if swiglu else ("fc1", "fc2")
        state |= {f"blocks.{block}.mlp.{name}.weight": torch.zeros(2, 2) for name in names}
    return state


@pytest.mark.parametrize("depth, swiglu, ffn", [(3, False, "MLP"), (7, True, "SwiGLU")])
def test_inspect_describes_a_vit(depth, swiglu, ffn):
    assert describe(vit_state(depth, swiglu)) == {
        "format": "meta", "family": "vit", "embed_dim": 24, "depth": depth,
        "summary": f"a DINOv3 ViT of width 24, depth {depth}, {ffn} FFN (meta format)",
    }  # fmt: skip


def test_inspect_describes_a_convnext_by_its_last_stage():
    state = {"downsample_layers.0.0.weight": torch.zeros(8, 3, 4, 4)}
    state |= {f"downsample_layers.{i}.1.weight": torch.zeros(width, 1, 2, 2) for i, width in [(1, 16), (2, 32), (3, 64)]}
    assert describe(state) == {
        "format": "meta", "family": "convnext", "embed_dim": 64,
        "summary": "a DINOv3 ConvNeXt with last width 64 (meta format)",
    }  # fmt: skip


@pytest.mark.parametrize("keys", [["cls_token"], ["storage_tokens"], ["head.weight"]])
def test_inspect_names_files_that_hold_no_dinov3_backbone(keys):
    assert describe({key: torch.zeros(1, 1, 4) for key in keys}) == {
        "format": None, "family": None, "summary": "no DINOv3 backbone weights",
    }  # fmt: skip


@pytest.mark.parametrize(
    "message, reason",
    [
        ("Weights only load failed.\nUnsupported GLOBAL os.system\nAdvice", "Unsupported GLOBAL os.system"),
        ("Weights only load failed.\n  Trying to load unsupported global builtins.eval  \nMore", "Trying to load unsupported global builtins.eval"),
        ("\n  first line only  \nsecond", "first line only"),
        ("", "not a tensor-only file"),
        ("GLOBAL " + "x" * 300, "GLOBAL " + "x" * 153),
    ],
    ids=["upper-case GLOBAL", "lower-case global", "no global named", "empty", "cut to 160"],
)  # fmt: skip
def test_pickle_refusal_reason_keeps_the_line_naming_the_global(message, reason):
    assert pickle_refusal_reason(RuntimeError(message)) == reason



# --- folders: one file, a .bin, sharded safetensors ------------------------------------------------------


def _tensors(prefix: str, count: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{i}.weight": torch.full((2, 3), float(i)) for i in range(count)}


def test_a_sharded_folder_is_read_whole_and_hashed_over_its_shards(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    first, second = _tensors("blocks", 2), _tensors("head", 3)
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(second, folder / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shards = [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]

    assert weight_files(folder) == shards
    state = load_state_dict_file(folder)
    assert sorted(state) == sorted(weight_map)
    assert all(torch.equal(state[name], tensor) for name, tensor in (first | second).items())
    joined = "".join(hashlib.sha256(shard.read_bytes()).hexdigest() for shard in shards)
    assert weights_digest(folder) == hashlib.sha256(joined.encode()).hexdigest()


def test_a_shard_named_by_the_index_but_missing_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(UserError, match="gone.safetensors is missing"):
        load_state_dict_file(folder)


def test_a_folder_with_a_pytorch_bin_is_read_without_running_pickles(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = _tensors("blocks", 2)
    torch.save(tensors, folder / "pytorch_model.bin")
    assert weight_files(folder) == [folder / "pytorch_model.bin"]
    state = load_state_dict_file(folder)
    assert sorted(state) == sorted(tensors) and all(torch.equal(state[k], v) for k, v in tensors.items())
    assert weights_digest(folder) == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()


def test_a_folder_prefers_safetensors_over_a_bin(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    save_file(_tensors("a", 1), folder / "model.safetensors")
    torch.save(_tensors("b", 1), folder / "pytorch_model.bin")
    assert weight_files(folder) == [folder / "model.safetensors"]
    assert sorted(load_state_dict_file(folder)) == ["a.0.weight"]


def test_verify_hash_returns_the_path_and_its_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "weights.pth"
    torch.save(_tensors("a", 1), path)
    found = verify_hash(path)
    assert found == WeightFile(path, hashlib.sha256(path.read_bytes()).hexdigest())
