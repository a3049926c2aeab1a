"""Reduced-precision backbones: bf16 where the config asks for it (feature cache, predict, feature tools),
close to float32, and a warning where the hardware would make it slower instead of faster."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.cli import main
from dinov3ds.config import cache_dir, load_config
from dinov3ds.data.build import build_datasets
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import UserError
from dinov3ds.models import hardware
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Classifier, backbone_dtype, backbone_from_config, load_model
from dinov3ds.training.feature_cache import cached_features
from dinov3ds.training.trainer import train
from tests.conftest import reference_dir, tiny

TINY = tiny("data.augment=false")


@pytest.fixture(autouse=True)
def detected_cpu(monkeypatch):
    """These tests choose the CPU's flags themselves: no DINOV3DS_CPU_BF16 pin (see conftest)."""
    monkeypatch.delenv(hardware.CPU_BF16_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    root = make_classification_folder(folder / "data", num_classes=3, train_per_class=4, val_per_class=2, size=32)
    result = train(load_config(None, [*TINY, f"data.root={root}", "trainer.max_epochs=1", f"output_dir={folder / 'run'}"]))
    return result.last_checkpoint, root


@pytest.mark.parametrize(
    ("flags", "dtype", "native"),
    [
        (frozenset({"avx2", "fma"}), torch.bfloat16, False),  # AVX2-only x86: bf16 is emulated
        (frozenset({"avx512f", "avx512_bf16"}), torch.bfloat16, True),
        (frozenset({"avx512f", "amx_bf16", "amx_tile"}), torch.bfloat16, True),
        (frozenset({"asimd", "bf16"}), torch.bfloat16, True),  # Arm with the BF16 extension
        (frozenset({"avx2"}), torch.float16, False),
        (frozenset({"avx2"}), torch.float32, True),
        (None, torch.bfloat16, None),  # no /proc/cpuinfo: unknown, no warning
    ],
)
def test_native_support_follows_cpu_flags(monkeypatch, flags, dtype, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.native_support(dtype, "cpu") is native
    message = hardware.slow_dtype_message(dtype, "cpu")
    assert (message is not None) == (native is False)


def test_emulated_bf16_load_warns_and_native_does_not(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="no native bfloat16.*backbone.dtype: float32"):
        load_backbone("vits16", "random", depth=1, dtype=torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with pytest.warns(UserWarning) as record:
        load_backbone("vits16", "random", depth=1, dtype=torch.bfloat16)
    assert not any("no native" in str(w.message) for w in record)  # only the RANDOM WEIGHTS warning


def test_bf16_feature_cache_is_separate_and_close_to_float32(tmp_path):
    """On the shared fixture's weights: bf16 pooled features have cosine >= 0.999 with float32."""
    weights = reference_dir() / "dinov3_vits16_d2_fixture-38c367ae.pth"
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=3, val_per_class=1, size=64)
    features = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(None, [f"backbone.weights={weights}", "backbone.overrides={depth: 2}", f"data.root={root}",
                                    "data.augment=false", "data.image_size=64", "data.num_workers=0",
                                    "trainer.progress_bar=false", f"backbone.dtype={dtype}"])  # fmt: skip
        backbone = backbone_from_config(config)
        assert backbone.dtype == getattr(torch, dtype)
        splits = build_datasets(config, backbone.mean, backbone.std)
        model = Classifier(backbone, len(splits.class_names), config, splits.class_names)
        features[dtype] = cached_features(model, splits.train, config).tensors[0]
    assert len(list((cache_dir() / "features").glob("*/index.json"))) == 2  # one store per dtype, never mixed up
    assert features["bfloat16"].dtype == torch.float32  # the head always trains on float32 features
    assert not torch.equal(features["float32"], features["bfloat16"])  # really computed in bf16
    cosine = F.cosine_similarity(features["float32"], features["bfloat16"], dim=1).min().item()
    assert cosine >= 0.999, cosine


def test_predict_runs_the_backbone_in_bf16_when_asked(classification_run, tmp_path):
    checkpoint, root = classification_run
    model = load_model(checkpoint, overrides=["backbone.dtype=bfloat16"])
    assert model.backbone.dtype == torch.bfloat16 and model.config.backbone.dtype == "bfloat16"
    top1 = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["predict", "--checkpoint", str(checkpoint), str(root / "val"), "--out", str(out),
                     f"backbone.dtype={dtype}"]) == 0  # fmt: skip
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        top1[dtype] = [row["labels"][0] for row in rows]
        assert len(rows) == 6
    agreement = sum(a == b for a, b in zip(top1["float32"], top1["bfloat16"])) / len(top1["float32"])
    assert agreement >= 5 / 6, top1


@pytest.mark.parametrize("override", ["head.name=dpt", "backbone.name=vitb16", "backbone.layers=[0]", "head={}", "task=segmentation"])
def test_overrides_the_head_depends_on_are_refused(classification_run, override):
    checkpoint, _ = classification_run
    key = override.split("=")[0]
    with pytest.raises(UserError, match=f"'{key}' is fixed by the trained head"):
        load_model(checkpoint, overrides=[override])


@pytest.mark.parametrize(
    ("dtype", "precision", "unfrozen", "flags", "expected"),
    [
        ("auto", "bf16-mixed", 0, {"avx512_bf16"}, torch.bfloat16),
        ("auto", "bf16-true", 0, {"amx_bf16"}, torch.bfloat16),
        ("auto", "bf16-mixed", 0, {"avx2"}, torch.float32),  # emulated bf16 would be slower than float32
        ("auto", "bf16-mixed", 2, {"avx512_bf16"}, torch.float32),  # blocks that train keep float32 weights
        ("auto", "32", 0, {"avx512_bf16"}, torch.float32),
        ("auto", "16-mixed", 0, {"avx512_fp16"}, torch.float32),  # fp16 storage only when asked (overflow risk)
        ("float32", "bf16-mixed", 0, {"avx512_bf16"}, torch.float32),  # an explicit dtype always wins
        ("bfloat16", "32", 0, {"avx2"}, torch.bfloat16),
    ],
)
def test_auto_dtype_follows_precision_freezing_and_hardware(monkeypatch, dtype, precision, unfrozen, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    config = load_config(None, [f"backbone.dtype={dtype}", f"trainer.precision={precision}",
                                f"backbone.unfreeze_last_blocks={unfrozen}"])  # fmt: skip
    assert backbone_dtype(config, "cpu") == expected


def test_bf16_mixed_training_stores_the_frozen_backbone_in_bf16(monkeypatch, tmp_path):
    """Where bf16 is native, `auto` + bf16-mixed trains on a bf16 backbone and caches bf16 features apart."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    root = make_classification_folder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2, size=32)
    keys = set()
    for precision in ("32", "bf16-mixed"):
        result = train(load_config(None, [*TINY, f"data.root={root}", "trainer.max_epochs=2", "optim.lr=0.01",
                                          f"trainer.precision={precision}", f"output_dir={tmp_path / precision}"]))  # fmt: skip
        assert result.best_checkpoint is not None and 0.0 <= result.metrics["val/top1"] <= 1.0
        keys |= {p.parent.name for p in (cache_dir() / "features").glob("*/index.json")}
        assert load_model(result.best_checkpoint).backbone.dtype == torch.bfloat16  # inference: the CPU decides
    assert len(keys) == 2 * 2  # train + val per dtype: a float32 cache is never reused for bf16


@pytest.mark.parametrize(
    ("device", "precision", "native", "expected"),
    [
        ("cuda", "32", True, torch.bfloat16),  # frozen inference on a bf16 GPU: half the memory, faster
        ("cuda", "32", False, torch.float32),  # a GPU without native bf16 (pre-Ampere)
        ("cpu", "32", True, torch.bfloat16),  # a CPU with AMX / AVX512-BF16 / Arm BF16: as a GPU
        ("cpu", "32", False, torch.float32),  # an AVX2-only CPU: bf16 would run emulated, slower
        ("cpu", "bf16-mixed", False, torch.float32),  # whatever training used
    ],
)
def test_auto_dtype_at_inference(monkeypatch, device, precision, native, expected):
    monkeypatch.setattr(hardware, "native_support", lambda dtype, where: native)
    config = load_config(None, ["backbone.dtype=auto", f"trainer.precision={precision}"])
    assert backbone_dtype(config, device, inference=True) == expected
    assert backbone_dtype(load_config(None, ["backbone.dtype=float32"]), device, inference=True) == torch.float32
