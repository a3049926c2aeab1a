"""`dtype: auto` at inference: bfloat16 on CPUs that compute it natively (AMX, AVX512-BF16, Arm BF16), float32
elsewhere, chosen from the hardware and said once; bf16 keeps the features and the predictions.

The suite pins DINOV3DS_CPU_BF16=0 (conftest) so results match on every CPU; these tests choose the CPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from dinov3ds.cli import main
from dinov3ds.data.io import find_images
from dinov3ds.data.synthetic import make_classification_folder, make_segmentation_folder
from dinov3ds.models import hardware
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import load_model
from tests.conftest import reference_dir, tiny

# Flag lines as /proc/cpuinfo prints them (abridged), for the three kinds of CPU the choice depends on.
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN3_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma sha_ni\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve asimdhp bf16 i8mm\n"


@pytest.fixture
def cpu(monkeypatch):
    """Make the process see the CPU described by a cpuinfo text, with no DINOV3DS_CPU_BF16 override."""

    def describe(cpuinfo: str) -> None:
        monkeypatch.delenv(hardware.CPU_BF16_VARIABLE, raising=False)
        monkeypatch.setattr(hardware, "cpu_flags", lambda: hardware.parse_cpu_flags(cpuinfo))
        hardware._log_once.cache_clear()

    return describe


@pytest.mark.parametrize(("cpuinfo", "expected", "named"), [
    (SAPPHIRE_RAPIDS, torch.bfloat16, "amx_bf16, avx512_bf16"),
    (NEOVERSE_V1, torch.bfloat16, "(bf16)"),
    (ZEN3_AVX2, torch.float32, "no native bfloat16"),
])  # fmt: skip
def test_auto_follows_the_cpu(cpu, cpuinfo, expected, named):
    cpu(cpuinfo)
    dtype, reason = hardware.inference_dtype("cpu")
    assert dtype == expected
    assert named in reason, reason


def test_unknown_cpu_stays_float32(monkeypatch):
    monkeypatch.delenv(hardware.CPU_BF16_VARIABLE, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)  # no /proc/cpuinfo (not Linux)
    dtype, reason = hardware.inference_dtype("cpu")
    assert dtype == torch.float32 and "not known" in reason


def test_variable_overrides_detection(cpu, monkeypatch):
    cpu(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, "0")
    assert hardware.inference_dtype("cpu")[0] == torch.float32
    cpu(ZEN3_AVX2)
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, "1")
    assert hardware.inference_dtype("cpu")[0] == torch.bfloat16


def test_bfloat16_features_match_float32_on_the_fixture():
    """The reference ViT-S in bf16 against itself in float32: patch and CLS cosine >= 0.999 on average."""
    folder = reference_dir()
    meta = json.loads((folder / "dinov3_vits16_d2.json").read_text())
    images = torch.load(folder / "dinov3_fixture_inputs.pt", weights_only=True)["input.b2_224x224"]
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        backbone = load_backbone("vits16", folder / meta["checkpoint_file"], dtype=dtype, depth=2)
        with torch.inference_mode():
            features = backbone(images)
        outputs[dtype] = (features.patches.flatten(2).transpose(1, 2).float(), features.cls.float())
    for ours, exact in zip(outputs[torch.bfloat16], outputs[torch.float32]):
        similarity = F.cosine_similarity(ours.flatten(0, -2), exact.flatten(0, -2), dim=-1)
        assert similarity.mean().item() >= 0.999, similarity.mean().item()


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory):
    """A classifier and a segmenter trained on the demo's generated data (tiny random backbone)."""
    base = tmp_path_factory.mktemp("demo")
    classes = make_classification_folder(base / "cls", num_classes=3, train_per_class=6, val_per_class=4, size=32)
    masks = make_segmentation_folder(base / "seg", num_classes=3, train=6, val=4, size=(32, 32))
    assert main(["train", *tiny("trainer.max_epochs=4", "optim.lr=0.01", f"data.root={classes}", depth=2),
                 f"output_dir={base / 'c'}"]) == 0  # fmt: skip
    assert main(["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={masks}",
                                "data.num_classes=3", "head.name=linear", "trainer.max_epochs=4", "optim.lr=0.01",
                                depth=2), f"output_dir={base / 's'}"]) == 0  # fmt: skip
    return base, classes, masks


def _both_dtypes(cpu, checkpoint):
    """The checkpoint loaded with `auto` on a native-bf16 CPU and on an AVX2-only one."""
    cpu(SAPPHIRE_RAPIDS)
    fast = load_model(checkpoint, device="cpu")
    cpu(ZEN3_AVX2)
    exact = load_model(checkpoint, device="cpu")
    assert (fast.backbone.dtype, exact.backbone.dtype) == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in fast.head.parameters())  # the head stays float32
    return fast, exact


def test_bfloat16_gives_the_same_top1(cpu, demo_checkpoints):
    base, classes, _ = demo_checkpoints
    fast, exact = _both_dtypes(cpu, base / "c" / "checkpoints" / "best.ckpt")
    images = find_images(classes / "val")
    top1 = [[row["labels"][0] for row in model.predict(images, topk=1)] for model in (fast, exact)]
    assert len(top1[0]) == 12
    assert top1[0] == top1[1]


def test_bfloat16_gives_the_same_labels(cpu, demo_checkpoints):
    base, _, masks = demo_checkpoints
    fast, exact = _both_dtypes(cpu, base / "s" / "checkpoints" / "best.ckpt")
    equal = total = 0
    for image in find_images(masks / "images" / "val"):
        labels, probabilities = fast.predict(image, return_probabilities=True)
        assert probabilities.dtype == "float32"  # the outputs stay float32
        equal, total = equal + int((labels == exact.predict(image)).sum()), total + labels.size
    print(f"bf16 labels equal to float32 on {equal / total:.4%} of pixels")
    assert equal / total >= 0.999


def test_predict_says_the_choice_once(cpu, demo_checkpoints, tmp_path, caplog):
    base, classes, _ = demo_checkpoints
    cpu(SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.INFO, logger="dinov3ds"):
        assert main(["predict", "--checkpoint", str(base / "c" / "checkpoints" / "best.ckpt"), str(classes / "val"),
                     "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0  # fmt: skip
    said = [record.getMessage() for record in caplog.records if "backbone in" in record.getMessage()]
    assert said == ["backbone in bfloat16: this CPU computes it natively (amx_bf16, avx512_bf16); "
                    "--float32 (backbone.dtype: float32) keeps float32"]  # fmt: skip
