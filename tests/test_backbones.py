"""The backbone loader's contract: registry, weight lookup, refusing bad files, hash cache, frozen features.

Numerical parity with Meta's code is `test_backbone_parity.py`; here the checkpoints come from
`tests.checkpoints.write_official_checkpoint`, so every test also runs in a clone without the shared fixtures.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dinov3ds.models.weights.hashes
from dinov3ds.errors import UserError
from dinov3ds.models.backbones import Backbone, load_backbone
from dinov3ds.models.variants import VARIANTS, get_spec
from tests.checkpoints import source_backbone, timm_to_official, write_official_checkpoint
from tests.conftest import reference_dir

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")

# Building a random timm model is most of a test's time on a shared 2-core CPU; tests never modify one.
cached_source = functools.cache(source_backbone)

LVD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SAT = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))

# Meta's hub entrypoints and files (fixture README, "Official variants"): name → (file, default taps, mean/std).
OFFICIAL = {
    "vits16": ("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", (2, 5, 8, 11), LVD),
    "vits16plus": ("dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", (2, 5, 8, 11), LVD),
    "vitb16": ("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", (2, 5, 8, 11), LVD),
    "vitl16": ("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", (4, 11, 17, 23), LVD),
    "vitl16_sat493m": ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", (4, 11, 17, 23), SAT),
    "vitl16plus": ("dinov3_vitl16plus_pretrain_lvd1689m-46503df0.pth", (4, 11, 17, 23), LVD),
    "vith16plus": ("dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth", (7, 15, 23, 31), LVD),
    "vit7b16": ("dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth", (9, 19, 29, 39), LVD),
    "vit7b16_sat493m": ("dinov3_vit7b16_pretrain_sat493m-a6675841.pth", (9, 19, 29, 39), SAT),
    "convnext_tiny": ("dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth", (0, 1, 2, 3), LVD),
    "convnext_small": ("dinov3_convnext_small_pretrain_lvd1689m-296db49d.pth", (0, 1, 2, 3), LVD),
    "convnext_base": ("dinov3_convnext_base_pretrain_lvd1689m-801f2ba9.pth", (0, 1, 2, 3), LVD),
    "convnext_large": ("dinov3_convnext_large_pretrain_lvd1689m-61fa432d.pth", (0, 1, 2, 3), LVD),
}


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory) -> Path:
    """One depth-1 vits16 checkpoint for the read-only tests (a test that modifies it copies it first)."""
    return write_official_checkpoint("vits16", tmp_path_factory.mktemp("vits16"))


@pytest.fixture(scope="module")
def vit() -> Backbone:
    return cached_source("vits16", depth=1)


@pytest.fixture(scope="module")
def convnext() -> Backbone:
    return cached_source("convnext_tiny", depth=1)


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def _same_outputs(first: Backbone, second: Backbone, images: Tensor) -> None:
    with torch.inference_mode():
        for a, b in zip(first(images), second(images), strict=True):
            assert a.shape == b.shape
            assert torch.equal(a, b)


# --- registry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFICIAL)
def test_registry_matches_the_official_table(name):
    file, taps, (mean, std) = OFFICIAL[name]
    spec = get_spec(name)
    assert get_spec(f"dinov3_{name}") is spec
    assert get_spec(name.upper()) is spec
    assert spec.weight_file == file
    assert spec.default_layers == taps
    assert (spec.mean, spec.std) == (mean, std)
    assert spec.url.endswith(f"/{file.split('_pretrain_')[0]}/{file}")


def test_registry_has_nothing_else():
    assert set(VARIANTS) == set(OFFICIAL)


def test_sat_aliases_and_statistics_differ():
    assert get_spec("vitl16_sat") is get_spec("dinov3_vitl16_sat493m")
    assert get_spec("vit7b16-sat") is get_spec("vit7b16_sat493m")
    assert get_spec("vitl16_sat493m").mean != get_spec("vitl16").mean
    assert get_spec("vitl16_sat493m").std != get_spec("vitl16").std


def test_registry_agrees_with_fixture_readme():
    """Every checkpoint file in the README's variant table is a known name whose file name matches."""
    readme = (reference_dir() / "README.md").read_text()
    rows = re.findall(
        r"^\| (dinov3_\w+)(?: \((LVD|SAT493M)\))? \|.*`(dinov3_[\w.-]+\.pth)` \|$", readme, re.M
    )
    assert len(rows) == len(OFFICIAL)
    for entrypoint, dataset, file in rows:
        name = entrypoint + ("_sat493m" if dataset == "SAT493M" else "")
        assert get_spec(name).weight_file == file


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UserError) as error:
        get_spec("vitz99")
    message = str(error.value)
    assert "vitz99" in message
    assert all(name in message for name in OFFICIAL)


# --- the checkpoint writer itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, name, overrides",
    [
        ("vits16_d2", "vits16", {"depth": 2}),
        ("vits16plus_d2", "vits16plus", {"depth": 2}),
        ("vit7b16style_e256h2_d2", "vit7b16", {"depth": 2, "embed_dim": 256, "num_heads": 2}),
        ("convnext_tiny_d1111", "convnext_tiny", {"depth": 1}),
    ],
)
def test_written_keys_match_meta(fixture, name, overrides):
    """Same key names, order and shapes as Meta's own `state_dict()` in the reference fixtures."""
    meta = json.loads((reference_dir() / f"dinov3_{fixture}.json").read_text())
    backbone = cached_source(name, **overrides)
    heads = backbone.model.blocks[0].attn.num_heads if backbone.spec.family == "vit" else None
    ours = timm_to_official(backbone.model.state_dict(), backbone.spec, heads)
    assert list(ours) == list(meta["state_dict_keys"])
    assert {k: list(v.shape) for k, v in ours.items()} == {
        k: v[0] for k, v in meta["state_dict_keys"].items()
    }


def test_written_buffers_have_official_values(vits16_file):
    state = torch.load(vits16_file, weights_only=True)
    q, k, v = state["blocks.0.attn.qkv.bias"].chunk(3)
    assert torch.equal(k, torch.zeros_like(k)) and q.abs().sum() > 0 and v.abs().sum() > 0
    assert torch.equal(
        state["blocks.0.attn.qkv.bias_mask"], torch.tensor([1.0] * 384 + [0.0] * 384 + [1.0] * 384)
    )
    assert torch.allclose(state["rope_embed.periods"], 100 ** (torch.arange(16) / 16))
    assert hashlib.sha256(vits16_file.read_bytes()).hexdigest().startswith(vits16_file.stem[-8:])


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vits16", {}),
        ("vits16plus", {}),
        ("vitl16_sat493m", {"embed_dim": 256, "num_heads": 4}),  # has Meta's extra local_cls_norm
        ("vit7b16", {"embed_dim": 256, "num_heads": 2}),
        ("convnext_tiny", {}),
    ],
)
def test_checkpoint_round_trip(tmp_path, name, overrides):
    path = write_official_checkpoint(name, tmp_path, **overrides)
    assert re.fullmatch(get_spec(name).weight_file.rsplit("-", 1)[0] + r"-[0-9a-f]{8}\.pth", path.name)
    loaded = load_backbone(name, path, depth=1, **overrides)
    assert loaded.identity["sha256"].startswith(path.stem[-8:])
    _same_outputs(cached_source(name, depth=1, **overrides), loaded, torch.randn(2, 3, 32, 48))


def test_bfloat16_load_keeps_rope_in_float32(vits16_file):
    backbone = load_backbone("vits16", vits16_file, depth=1, dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in backbone.parameters())
    assert backbone.model.rope.periods.dtype == torch.float32
    with torch.inference_mode():
        assert backbone(torch.randn(1, 3, 32, 32)).cls.dtype == torch.bfloat16


# --- finding the weights ----------------------------------------------------------------------------------


def test_default_weights_come_from_checkpoint_dir(tmp_path, monkeypatch, vits16_file):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = _copy(vits16_file, folder / vits16_file.name)
    # The official name carries Meta's hash; point the spec at our file's name so its hash check passes.
    monkeypatch.setitem(VARIANTS, "vits16", dataclasses.replace(get_spec("vits16"), weight_file=path.name))
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(folder))
    backbone = load_backbone("vits16", depth=1)
    assert backbone.identity["weights"] == path.name
    _same_outputs(backbone, load_backbone("vits16", vits16_file, depth=1), torch.randn(1, 3, 32, 32))


def test_default_weights_use_the_official_file_name(tmp_path, monkeypatch, vits16_file):
    """A file under the official name is found, then refused because its content has another hash."""
    spec = get_spec("vits16")
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(tmp_path))
    _copy(vits16_file, tmp_path / spec.weight_file)
    with pytest.raises(UserError, match=re.escape(str(tmp_path / spec.weight_file))):
        load_backbone("vits16", depth=1)


def test_missing_default_weights_explain_where_and_random(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./checkpoints either
    with pytest.raises(UserError) as error:
        load_backbone("vitb16")
    message = str(error.value)
    assert "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" in message
    assert "random" in message


def test_missing_explicit_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_backbone("vits16", tmp_path / "nowhere.pth")


# --- bad files --------------------------------------------------------------------------------------------


def test_wrong_variant_file_is_named(vits16_file):
    with pytest.raises(UserError, match=r"width 384.*'vitb16'.*width 768"):
        load_backbone("vitb16", vits16_file)
    with pytest.raises(UserError, match=r"width 384.*'vitb16'.*width 768"):
        load_backbone("vitb16", vits16_file, depth=1)  # a depth override must not hide the width mismatch
    with pytest.raises(UserError, match=r"ViT of width 384.*'convnext_tiny' expects a convnext"):
        load_backbone("convnext_tiny", vits16_file)


def test_wrong_depth_file(vits16_file):
    with pytest.raises(UserError, match=r"does not fit 'vits16'.*depth 1"):
        load_backbone("vits16", vits16_file)


def test_truncated_file(tmp_path, vits16_file):
    data = vits16_file.read_bytes()
    path = tmp_path / "cut.pth"  # no hash in the name: the loader itself must notice
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        load_backbone("vits16", path, depth=1)


def test_hash_mismatch(tmp_path, vits16_file):
    path = _copy(vits16_file, tmp_path / "dinov3_vits16_pretrain_lvd1689m-0badf00d.pth")
    with pytest.raises(UserError, match=r"corrupt or not the official file.*0badf00d"):
        load_backbone("vits16", path, depth=1)


@pytest.mark.parametrize("content", ["this is not a checkpoint\n", ""])
def test_text_file(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_text(content)
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_backbone("vits16", path, depth=1)


class _Exploit:
    """Pickles as a call to os.system: loading it without weights_only would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "payload": _Exploit(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused to load.*Python objects"):
        load_backbone("vits16", path, depth=1)
    assert not marker.exists()


def test_tensor_file_without_a_backbone(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no DINOv3 backbone weights"):
        load_backbone("vits16", path, depth=1)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError, match="not a state dict of tensors"):
        load_backbone("vits16", path, depth=1)


# --- hash cache and memory path ---------------------------------------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch) -> list[int]:
    """Counts SHA-256 computations made through dinov3ds.models.weights.hashes."""
    calls: list[int] = []
    real = hashlib.sha256

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dinov3ds.models.weights.hashes.hashlib, "sha256", counting)
    return calls


def test_hash_is_cached_until_the_file_changes(tmp_path, vits16_file, hash_calls):
    path = _copy(vits16_file, tmp_path / vits16_file.name)
    load_backbone("vits16", path, depth=1)
    assert len(hash_calls) == 1
    assert (dinov3ds.models.weights.hashes.cache_dir() / "sha256.json").is_file()
    load_backbone("vits16", path, depth=1)
    assert len(hash_calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    load_backbone("vits16", path, depth=1)
    assert len(hash_calls) == 2
    with open(path, "ab") as handle:  # a changed size is re-hashed and no longer matches the name
        handle.write(b"\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="corrupt"):
        load_backbone("vits16", path, depth=1)
    assert len(hash_calls) == 3


def test_loading_uses_mmap_and_weights_only(monkeypatch, vits16_file):
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_backbone("vits16", vits16_file, depth=1)
    assert calls and all(c.get("mmap") is True and c.get("weights_only") is True for c in calls)


# --- frozen -----------------------------------------------------------------------------------------------


def test_frozen_and_always_in_eval(vit):
    assert not any(p.requires_grad for p in vit.parameters())
    wrapper = nn.ModuleDict({"backbone": vit, "head": nn.Linear(384, 2)})
    wrapper.train()
    assert wrapper.training and wrapper["head"].training
    assert not any(m.training for m in vit.modules())
    vit.train(True)
    assert not any(m.training for m in vit.modules())
    with torch.enable_grad():
        out = vit(torch.randn(1, 3, 32, 32))
    assert out.cls.requires_grad is False
    assert out.patches.grad_fn is None


# --- features ---------------------------------------------------------------------------------------------


def test_vit_forward_shapes_non_square(vit):
    with torch.inference_mode():
        out = vit(torch.randn(2, 3, 32, 48))
    assert out.cls.shape == (2, 384)
    assert out.patches.shape == (2, 384, 2, 3)
    assert out.registers.shape == (2, 4, 384)
    assert vit.num_registers == 4


def test_vit_patches_are_row_major(vit):
    """`forward` reshapes tokens itself; it must agree with timm's own NCHW taps of the last block."""
    images = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        out = vit(images)
        ((patches, cls, registers),) = vit.get_intermediate_layers(images, [0], return_registers=True)
    assert torch.allclose(out.patches, patches, atol=1e-6)
    assert torch.allclose(out.cls, cls, atol=1e-6)
    assert torch.allclose(out.registers, registers, atol=1e-6)


def test_vit_intermediate_layers(vit):
    images = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        taps = vit.get_intermediate_layers(images, [0])
        negative = vit.get_intermediate_layers(images, [-1])
        raw = vit.get_intermediate_layers(images, [0], norm=False)
    assert len(taps) == 1 and len(taps[0]) == 2
    patches, cls = taps[0]
    assert patches.shape == (2, 384, 2, 3) and cls.shape == (2, 384)
    assert torch.equal(negative[0][0], patches)
    assert not torch.allclose(raw[0][0], patches)
    assert vit.feature_channels([0]) == [384] and vit.feature_strides([0]) == [16]


def test_input_not_multiple_of_16(vit, convnext):
    for backbone in (vit, convnext):
        with pytest.raises(UserError, match=r"40x48 is not a multiple of 16"):
            backbone(torch.randn(1, 3, 40, 48))
        with pytest.raises(UserError, match="not a multiple of 16"):
            backbone.get_intermediate_layers(torch.randn(1, 3, 32, 40), [0])


def test_out_of_range_layers(vit, convnext):
    with pytest.raises(UserError, match=r"layers \[1\] out of range.*depth 1"):
        vit.get_intermediate_layers(torch.randn(1, 3, 32, 32), [1])
    with pytest.raises(UserError, match="out of range"):
        vit.feature_channels([-2])
    with pytest.raises(UserError, match=r"layers \[4\] out of range"):
        convnext.get_intermediate_layers(torch.randn(1, 3, 64, 64), [0, 4])


def test_convnext_stage_maps(convnext):
    images = torch.randn(2, 3, 64, 96)
    layers = [0, 1, 2, 3]
    with torch.inference_mode():
        taps = convnext.get_intermediate_layers(images, layers)
        out = convnext(images)
    channels = [patches.shape[1] for patches, _ in taps]
    strides = [64 // patches.shape[2] for patches, _ in taps]
    assert channels == [96, 192, 384, 768]
    assert strides == [4, 8, 16, 32]
    assert all(96 // patches.shape[3] == s for (patches, _), s in zip(taps, strides, strict=True))
    assert all(cls.shape == (2, c) for (_, cls), c in zip(taps, channels, strict=True))
    assert convnext.feature_channels(layers) == channels
    assert convnext.feature_strides(layers) == strides
    assert (
        out.cls.shape == (2, 768)
        and out.patches.shape == (2, 768, 2, 3)
        and out.registers.shape == (2, 0, 768)
    )
    assert torch.allclose(out.patches, taps[3][0], atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_feature_metadata_matches_default_taps(family):
    """What a head is built from (`feature_channels/strides`) must describe what it will receive."""
    backbone = (
        cached_source("vits16", depth=4) if family == "vit" else cached_source("convnext_tiny", depth=1)
    )
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        taps = backbone.get_intermediate_layers(images)
    assert [p.shape[1] for p, _ in taps] == backbone.feature_channels()
    assert [64 // p.shape[2] for p, _ in taps] == backbone.feature_strides()


@pytest.mark.parametrize("depth, expected", [(1, [0, 0, 0, 0]), (2, [0, 0, 1, 1]), (4, [0, 1, 2, 3])])
def test_default_taps_of_tiny_models(depth, expected):
    """Reduced models keep four taps (repeating blocks when there are fewer), so heads see four inputs."""
    backbone = cached_source("vits16", depth=depth)
    assert backbone.resolve_layers(None) == expected
    with torch.inference_mode():
        taps = backbone.get_intermediate_layers(torch.randn(1, 3, 32, 32))
    assert len(taps) == len(backbone.feature_channels()) == len(backbone.feature_strides()) == 4


def test_vit_taps_follow_the_requested_order():
    """Taps come back in the order asked for, repeats included, as ConvNeXt's do."""
    backbone = cached_source("vits16", depth=2)
    images = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        forward = backbone.get_intermediate_layers(images, [0, 1])
        reverse = backbone.get_intermediate_layers(images, [1, 0])
        repeated = backbone.get_intermediate_layers(images, [1, 1])
    assert len(reverse) == 2 and len(repeated) == 2
    assert torch.equal(reverse[0][0], forward[1][0]) and torch.equal(reverse[1][0], forward[0][0])
    assert torch.equal(repeated[0][0], forward[1][0]) and torch.equal(repeated[1][0], forward[1][0])


# --- random weights ---------------------------------------------------------------------------------------


def test_random_weights_warn_and_are_deterministic():
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS for vits16"):
        first = load_backbone("vits16", "random", depth=1)
    torch.manual_seed(1234)  # the global RNG must not matter
    second = load_backbone("vits16", "random", depth=1)
    assert first.identity["weights"] == "random"
    _same_outputs(first, second, torch.randn(1, 3, 32, 48))


def test_random_weights_are_said_once_per_load_in_a_script_with_logging(monkeypatch, capsys):
    """A script with `logging.basicConfig` (a root handler on stderr) and Python's default warning display: the
    warning was shown and the same line logged, and on a second load from the same line only the log line."""
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))  # fmt: skip
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr
    logging.getLogger().addHandler(handler)
    try:
        for shown in ("default", "ignore"):  # a script; the CLI, which hides library warnings, gets the log line
            with warnings.catch_warnings():
                warnings.simplefilter(shown)
                capsys.readouterr()
                for _ in range(2):
                    load_backbone("vits16", "random", depth=1)
                said = [line for line in capsys.readouterr().err.splitlines() if "RANDOM WEIGHTS for vits16" in line]
                assert len(said) == 2, (shown, said)
    finally:
        logging.getLogger().removeHandler(handler)


def test_training_checkpoint_teacher_layout_loads_like_the_plain_file(tmp_path, vits16_file):
    """Meta's training checkpoints hold {"teacher": {"backbone.<key>": ...}, "student": ...}."""
    state = torch.load(vits16_file, weights_only=True)
    teacher = {f"backbone.{key}": value for key, value in state.items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(2, 2)  # not the backbone: must be left out
    path = tmp_path / "training_checkpoint.pth"
    torch.save({"teacher": teacher, "student": {"backbone.cls_token": torch.ones(1)}, "iteration": torch.tensor(7)}, path)
    images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    _same_outputs(load_backbone("vits16", path, depth=1), load_backbone("vits16", vits16_file, depth=1), images)


def test_state_dict_with_a_non_tensor_value_is_refused(tmp_path, vits16_file):
    state = torch.load(vits16_file, weights_only=True)
    path = tmp_path / "mixed.pth"
    torch.save({**state, "epoch": 3, "note": "finetuned"}, path)
    with pytest.raises(UserError, match="not a state dict of tensors") as error:
        load_backbone("vits16", path, depth=1)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
