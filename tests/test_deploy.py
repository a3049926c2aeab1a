"""Deployment (issue 34): one ONNX file for every size and batch, its metadata, fp16, the export's parity check
and one-line failures, `predict` on the file equal to `predict` on the checkpoint, serving without PyTorch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.deploy.metadata import PREFIX, ServingFacts
from dinov3ds.deploy.onnx_export import export_onnx
from dinov3ds.deploy.runtime import OnnxModel
from dinov3ds.deploy.traceable import rope_embed
from dinov3ds.errors import UserError
from dinov3ds.heads import HEADS, SegmentationHead
from dinov3ds.models.checkpoints import FORMAT_VERSION
from dinov3ds.models.finetune import add_adapters
from dinov3ds.models.tasks import Classifier, Segmenter, backbone_from_config, load_model
from tests.checkpoints import write_official_checkpoint
from tests.conftest import tiny

CLASSES = ["sky", "road", "car"]
README = Path(__file__).parents[1] / "README.md"

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Official-format files with perturbed weights: RoPE and attention matter, so a frozen size would show."""
    folder = tmp_path_factory.mktemp("weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"vits16": write_official_checkpoint("vits16", folder, depth=2),
                "convnext_tiny": write_official_checkpoint("convnext_tiny", folder)}  # fmt: skip


def build(weights: dict[str, Path], task: str = "segmentation", head: str = "linear", options: str = "{}",
          backbone: str = "vits16") -> Classifier | Segmenter:  # fmt: skip
    """A model on real (perturbed) weights with a head whose weights are perturbed too, as after training."""
    depth = 2 if backbone == "vits16" else 1
    config = load_config(None, [*tiny(depth=depth), f"task={task}", f"backbone.name={backbone}", f"head.name={head}",
                                f"head.options={options}", f"backbone.weights={weights[backbone]}",
                                f"data.class_names=[{','.join(CLASSES)}]", "data.num_classes=3"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (Classifier if task == "classification" else Segmenter)(backbone_from_config(config), 3, config, CLASSES)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def save_checkpoint(model: Classifier | Segmenter, path: Path) -> Path:
    """The head-only checkpoint training writes (the frozen backbone is named, not stored)."""
    state = {f"model.head.{key}": value for key, value in model.head.state_dict().items()}
    torch.save({"state_dict": state, "dinov3ds": {
        "format_version": FORMAT_VERSION, "task": model.config.task, "config": model.config.model_dump(mode="json"),
        "class_names": CLASSES, "num_classes": 3, "backbone": model.backbone.identity}}, path)  # fmt: skip
    return path


def run_torch(model: Classifier | Segmenter, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


HEAD_CASES = [
    ("classification", "linear", "{}", "vits16"),
    ("classification", "linear", "{}", "convnext_tiny"),
    ("segmentation", "linear", "{}", "convnext_tiny"),
    *(("segmentation", name, "{}", "vits16") for name in ("linear", "segdino", "dpt", "unet", "unet_sum")),
    ("segmentation", "unet_adapter", "{conv_channels: 16, decoder_channels: [32, 16, 16, 16]}", "vits16"),
    ("segmentation", "fapm", "{adapter_dim: 64, conv_channels: 16, rank: 32, num_heads: 4, extra_extractors: 0}", "vits16"),
    ("segmentation", "pmt", "{num_blocks: 2, num_queries: 5}", "vits16"),
    ("segmentation", "eomt", "{num_blocks: 1, num_queries: 5}", "vits16"),
]


@pytest.mark.parametrize("task, head, options, backbone", HEAD_CASES, ids=[f"{c[0][:3]}-{c[1]}-{c[3]}" for c in HEAD_CASES])
def test_one_file_serves_every_size_and_batch(weights, tmp_path, task, head, options, backbone):
    """Parity at export (square, landscape batch 2, portrait), then a fourth size and batch 3 from the same file."""
    model = build(weights, task, head, options, backbone)
    result = export_onnx(model, tmp_path / "model.onnx")
    multiple = model.input_multiple
    assert [p.shape[2:] for p in result.parity] == [(32, 32), (32, 48), (48, 32)] if multiple == 16 else len(result.parity) == 3
    assert all(p.probabilities <= 1e-3 and p.logits <= 1e-2 for p in result.parity), result.parity
    assert result.inputs == [("images", ["batch", 3, "height", "width"])]
    batch = np.random.default_rng(0).standard_normal((3, 3, 3 * multiple, 4 * multiple)).astype(np.float32)
    produced = OnnxModel(result.path, device="cpu").logits(batch)
    np.testing.assert_allclose(produced, run_torch(model, batch), atol=1e-3)


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_fine_tuned_adapters_are_merged_and_checked_against_the_unmerged_model(weights, tmp_path, mode):
    model = build(weights, head="segdino")
    batch = np.random.default_rng(2).standard_normal((1, 3, 32, 64)).astype(np.float32)
    frozen = run_torch(model, batch)
    model.config.backbone.finetune = mode
    add_adapters(model.backbone, model.config.backbone)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained adapters: their updates are not zero
        for name, parameter in model.backbone.named_parameters():
            if ".lora_" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    tuned = run_torch(model, batch)
    result = export_onnx(model, tmp_path / "tuned.onnx")
    assert not any("lora" in node.name.lower() for node in onnx.load(str(result.path)).graph.node)
    produced = OnnxModel(result.path, "cpu").logits(batch)
    np.testing.assert_allclose(produced, tuned, atol=1e-3)
    assert np.abs(produced - frozen).max() > 1e-2  # the adapters are in the graph


def test_rope_stand_in_equals_timm_bit_for_bit(weights):
    rope = build(weights).backbone.model.rope
    for shape in [(2, 3), (5, 1), (7, 4)]:
        assert torch.equal(rope_embed(rope, shape), rope.get_embed(shape=shape))


def test_metadata_round_trips_and_is_self_describing(weights, tmp_path):
    model = build(weights, head="segdino")
    result = export_onnx(model, tmp_path / "seg.onnx")
    props = {entry.key: entry.value for entry in onnx.load(str(result.path)).metadata_props}
    assert all(key.startswith(PREFIX) for key in props)
    assert json.loads(props["dinov3ds.class_names"]) == CLASSES and props["dinov3ds.task"] == "segmentation"
    assert json.loads(props["dinov3ds.mean"]) == list(model.backbone.mean) and props["dinov3ds.color_order"] == "RGB"
    assert json.loads(props["dinov3ds.value_range"]) == [0, 1] and props["dinov3ds.head"] == "segdino"
    assert props["dinov3ds.weights_sha256"] == model.backbone.identity["sha256"] and len(props["dinov3ds.weights_sha256"]) == 64
    assert int(props["dinov3ds.input_multiple"]) == 16 and int(props["dinov3ds.label_offset"]) == 0
    assert ServingFacts.from_props(props, "seg.onnx") == result.facts == OnnxModel(result.path, "cpu").facts


def test_fixed_size_export_takes_that_size_only(weights, tmp_path):
    result = export_onnx(build(weights, "classification"), tmp_path / "fixed.onnx", height=32, width=48)
    assert result.inputs == [("images", ["batch", 3, 32, 48])] and [p.shape for p in result.parity] == [(2, 3, 32, 48)]
    runner = OnnxModel(result.path, "cpu")
    assert runner.logits(np.zeros((1, 3, 32, 48), np.float32)).shape == (1, 3)
    with pytest.raises(UserError, match="exported for 32x48 inputs, not 32x32"):
        runner.logits(np.zeros((1, 3, 32, 32), np.float32))


def test_half_keeps_fragile_parts_in_fp32_and_halves_the_file(weights, tmp_path):
    model = build(weights, head="eomt", options="{num_blocks: 1, num_queries: 5}")
    full = export_onnx(model, tmp_path / "fp32.onnx")
    half = export_onnx(model, tmp_path / "fp16.onnx", half=True)
    assert half.facts.precision == "float16" and all(p.probabilities <= 5e-3 for p in half.parity), half.parity
    ratio = half.path.stat().st_size / full.path.stat().st_size
    assert 0.45 < ratio < 0.6, ratio
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(half.path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]}
    kept = {node.op_type for node in graph.node if node.op_type in ("Softmax", "LayerNormalization", "Sin", "Cos")
            and all(types.get(name) == onnx.TensorProto.FLOAT for name in node.output)}  # fmt: skip
    assert kept == {"Softmax", "LayerNormalization", "Sin", "Cos"}
    weight_bytes = {kind: sum(len(t.raw_data) for t in graph.initializer if t.data_type == kind) for kind in (1, 10)}
    assert weight_bytes[onnx.TensorProto.FLOAT16] > 0.95 * sum(weight_bytes.values()), weight_bytes
    assert types[graph.input[0].name] == types[graph.output[0].name] == onnx.TensorProto.FLOAT


class CumulativeHead(SegmentationHead):
    """A real head using an op ONNX has no form for (cumulative max)."""

    def __init__(self, in_channels, strides, num_classes, tokens=None) -> None:
        super().__init__(in_channels, strides, num_classes)
        self.classifier = torch.nn.Conv2d(in_channels[-1], num_classes, 1)

    def forward(self, features, image):
        logits = self.classifier(features[-1]).cummax(dim=-1).values
        return torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear")


def test_an_op_without_onnx_form_is_one_line_naming_head_and_op(weights, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(HEADS, "cumulative", CumulativeHead)
    with pytest.raises(UserError) as caught:
        export_onnx(build(weights, head="cumulative"), tmp_path / "bad.onnx")
    message = str(caught.value)
    assert "head 'cumulative'" in message and "aten::cummax" in message and "\n" not in message
    assert "Torch IR graph" not in capfd.readouterr().out and not (tmp_path / "bad.onnx").exists()


class Exported(dict):
    """Checkpoints and the ONNX files the CLI writes from them, made on first use (each test stays short)."""

    def __init__(self, weights: dict[str, Path], folder: Path) -> None:
        super().__init__()
        self.weights, self.folder = weights, folder
        self["images"] = folder / "images"
        self["images"].mkdir()
        rng = np.random.default_rng(0)
        for index, (height, width) in enumerate([(45, 61), (70, 33), (32, 32)]):
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(self["images"] / f"{index}.png")

    def __missing__(self, name: str) -> Path:
        task = name.removesuffix(".onnx")
        checkpoint = save_checkpoint(build(self.weights, task, "segdino" if task == "segmentation" else "linear"),
                                     self.folder / f"{task}.ckpt")  # fmt: skip
        out = self.folder / f"{task}.onnx"
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
        self[task], self[task + ".onnx"] = checkpoint, out
        return self[name]


class FrozenWidthHead(CumulativeHead):
    """A real head with shape-dependent Python the tracer freezes: its logits scale with float(width)."""

    def forward(self, features, image):
        logits = self.classifier(features[-1]) * (float(image.shape[-1]) / 16)
        return torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear")


def test_a_size_frozen_in_the_graph_fails_the_parity_check(weights, tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "frozen", FrozenWidthHead)
    with pytest.raises(UserError, match=r"head 'frozen': the float32 graph differs from PyTorch at 32x32 .*--height/--width"):
        export_onnx(build(weights, head="frozen"), tmp_path / "frozen.onnx")
    assert not (tmp_path / "frozen.onnx").exists()


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory) -> Exported:
    return Exported(weights, tmp_path_factory.mktemp("exported"))


def predict_both(exported, task, tmp_path, capsys, *extra) -> tuple[Path, Path, list[str], list[str]]:
    outputs, summaries = [], []
    exported[task + ".onnx"]  # exported first: its own report is not part of the summaries compared
    capsys.readouterr()
    for name in (task, task + ".onnx"):
        out = tmp_path / name.replace(".", "_")
        assert main(["predict", "--checkpoint", str(exported[name]), str(exported["images"]), "--out", str(out),
                     "--device", "cpu", *extra]) == 0  # fmt: skip
        outputs.append(out)
        summaries.append(capsys.readouterr().out.replace(str(out), "OUT").splitlines())
    return outputs[0], outputs[1], summaries[0], summaries[1]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_predict_on_onnx_equals_predict_on_ckpt_segmentation(exported, tmp_path, capsys, mode):
    ckpt, onnx_out, said_ckpt, said_onnx = predict_both(exported, "segmentation", tmp_path, capsys, "--mode", mode,
                                                        "inference.crop=32", "inference.stride=16")  # fmt: skip
    assert said_onnx == said_ckpt
    files = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*.png"))
    assert files == sorted(p.relative_to(onnx_out) for p in onnx_out.rglob("*.png")) and len(files) == 6
    for name in (f for f in files if f.name.endswith(".labels.png")):
        agree = np.mean(np.asarray(Image.open(ckpt / name)) == np.asarray(Image.open(onnx_out / name)))
        assert agree >= 0.995, (name, agree)


def test_predict_on_onnx_equals_predict_on_ckpt_classification(exported, tmp_path, capsys):
    ckpt, onnx_out, said_ckpt, said_onnx = predict_both(exported, "classification", tmp_path, capsys, "--topk", "2")
    def unscored(lines: list[str]) -> list[str]:
        return [re.sub(r"\d\.\d{4}", "P", line) for line in lines]  # labels and paths, not the 4th decimal

    assert unscored(said_onnx) == unscored(said_ckpt) and len(said_onnx) == 4
    rows = [[json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()] for folder in (ckpt, onnx_out)]
    assert [r["labels"] for r in rows[0]] == [r["labels"] for r in rows[1]]
    np.testing.assert_allclose([r["probabilities"] for r in rows[0]], [r["probabilities"] for r in rows[1]], atol=1e-4)


def test_a_file_without_dinov3ds_metadata_or_a_trained_setting_is_refused(exported, tmp_path, capsys):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False, input_names=["images"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    fixed = (exported["segmentation.onnx"], "'head.name' is fixed in the exported file")
    for path, said, *extra in [(plain, "has no dinov3ds metadata"), (garbage, "is not an ONNX model onnxruntime can load"),
                               (*fixed, "head.name=dpt")]:  # fmt: skip
        capsys.readouterr()
        argv = ["predict", "--checkpoint", str(path), str(exported["images"]), "--out", str(tmp_path / "o"), *extra]
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert said in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "o").exists()


def test_export_prints_what_it_wrote(exported, tmp_path, capsys):
    exported["segmentation"]  # made first: its own report is not the one read here
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(exported["segmentation"]), "--out", str(tmp_path / "s.onnx"), "--half"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"wrote .*s\.onnx \([\d.]+ MB, 0\.[45]\d of float32, float16, segmentation, 3 classes", said)
    assert "images: float32 [batch, 3, height, width]" in said and "logits: float32 [batch, 3, height, width]" in said
    assert len(re.findall(r"logits \S+e-\d+  probabilities \S+e-\d+", said)) == 3


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    return re.search(r"<!-- serving example: tests/test_deploy.py -->\s*```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_readme_serving_example_runs_without_torch_or_dinov3ds(exported, tmp_path, task):
    code = readme_example()
    assert "dinov3ds" not in re.sub(r'"dinov3ds\.\w+"', "", code) and "torch" not in code
    (tmp_path / "model.onnx").symlink_to(exported[task + ".onnx"])
    Image.open(exported["images"] / "0.png").save(tmp_path / "photo.jpg")
    blocked = "import sys; sys.modules.update(torch=None, dinov3ds=None)\n"
    done = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    if task == "segmentation":
        assert Image.open(tmp_path / "labels.png").size == (61, 45)
    else:
        assert done.stdout.strip() in CLASSES


def test_runtime_imports_no_torch(exported):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dinov3ds.deploy.runtime import OnnxModel\nimport numpy as np\n"
            f"m = OnnxModel({str(exported['segmentation.onnx'])!r}, 'cpu')\n"
            "print(m.logits(np.zeros((2, 3, 32, 64), np.float32)).shape, m.facts.class_names)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"(2, 3, 32, 64) {CLASSES}"


def test_the_exported_file_matches_the_checkpoint_after_loading(exported):
    """The CLI path end to end: the file equals `load_model` of the checkpoint on a new size."""
    model = load_model(exported["segmentation"], device="cpu")
    batch = np.random.default_rng(1).standard_normal((1, 3, 64, 48)).astype(np.float32)
    produced = OnnxModel(exported["segmentation.onnx"], "cpu").logits(batch)
    np.testing.assert_allclose(produced, run_torch(model, batch), atol=1e-3)


def test_torchscript_export_keeps_working_with_its_facts_beside_it(exported, tmp_path, capsys):
    out = tmp_path / "seg.pt"
    assert main(["export", "--checkpoint", str(exported["segmentation"]), "--format", "torchscript", "--out", str(out),
                 "--height", "32", "--width", "48"]) == 0  # fmt: skip
    assert "max abs difference to PyTorch" in capsys.readouterr().out
    facts = json.loads((tmp_path / "seg.pt.json").read_text())
    assert facts["class_names"] == CLASSES and facts["input_size"] == [32, 48] and facts["task"] == "segmentation"
    assert torch.jit.load(str(out))(torch.zeros(2, 3, 32, 48)).shape == (2, 3, 32, 48)


def test_export_refuses_a_size_off_the_input_multiple(exported, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["export", "--checkpoint", str(exported["classification"]), "--out", str(out), "--height", "30"]) == 2
    error = capsys.readouterr().err.strip()
    assert "30x32 is not a multiple of 16" in error and len(error.splitlines()) == 1 and not out.exists()
