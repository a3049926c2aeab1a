"""Depth through the commands that were built for the other tasks (issue 36, "every command accepts depth
checkpoints"): export to one ONNX file of metres for any size (linear and dpt heads, fp32 and --half), `predict`
on that file equal to `predict` on the checkpoint, serving without PyTorch; check-data on depth folders; the run
report of a depth run; a dpt depth head that learns."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.data.depth import load_depth
from dinov3ds.data.synthetic import make_depth_folder
from dinov3ds.deploy.metadata import ServingFacts
from dinov3ds.deploy.onnx_export import export_onnx
from dinov3ds.deploy.runtime import OnnxModel
from dinov3ds.errors import UserError
from dinov3ds.metrics.depth import image_metrics
from dinov3ds.models import inference as inference_module
from dinov3ds.models.checkpoints import FORMAT_VERSION
from dinov3ds.models.depth import DepthEstimator
from dinov3ds.models.tasks import backbone_from_config
from dinov3ds.report.figures import main_metric, read_metrics
from dinov3ds.report.reading import read_run
from tests import test_deploy
from tests.conftest import tiny

pytest.importorskip("onnxruntime")

weights = test_deploy.weights  # its official-format backbone files (a fixture, registered here)

MIN_DEPTH, MAX_DEPTH = 0.5, 10.0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """What conftest does for each test, for module fixtures (set up before it): one intra-op thread, since a
    second only adds contention on a busy 2-core machine (the dpt run: 6 s against 25-35 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
HEADS = {"linear": "{}", "dpt": "{features: 32, reassemble_channels: [16, 32, 64, 64]}"}


def build_depth(weights: dict[str, Path], head: str = "linear") -> DepthEstimator:
    """A depth model on real (perturbed) weights whose head predicts a depth that varies over the image, as after
    training (a fresh head predicts nearly the same depth everywhere): the head perturbed a little, then its last
    convolution scaled so the bin logits spread with std 4 (soft bins: no near-tie between two bins)."""
    config = load_config(None, [*tiny(depth=2), "task=depth", f"head.name={head}", f"head.options={HEADS[head]}",
                                f"backbone.weights={weights['vits16']}", f"depth.min_depth={MIN_DEPTH}",
                                f"depth.max_depth={MAX_DEPTH}", "depth.bins=64"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DepthEstimator(backbone_from_config(config), 1, config, ["depth"]).eval()
    generator = torch.Generator().manual_seed(1)
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 64][-1]
    probe = torch.randn(2, 3, 48, 48, generator=generator)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        spread = model.head(model.features(probe), probe).std()
        last.weight.mul_(4 / spread)
        last.bias.mul_(4 / spread)
    return model


def save_depth_checkpoint(model: DepthEstimator, path: Path) -> Path:
    """The head-only checkpoint depth training writes."""
    state = {f"model.head.{key}": value for key, value in model.head.state_dict().items()}
    torch.save({"state_dict": state, "dinov3ds": {
        "format_version": FORMAT_VERSION, "task": "depth", "config": model.config.model_dump(mode="json"),
        "class_names": ["depth"], "num_classes": 1, "backbone": model.backbone.identity}}, path)  # fmt: skip
    return path


def torch_depth(model: DepthEstimator, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_a_depth_model_exports_one_file_of_metres_for_every_size(weights, tmp_path, head):
    model = build_depth(weights, head)
    result = export_onnx(model, tmp_path / "depth.onnx")
    assert [p.shape[2:] for p in result.parity] == [(32, 32), (32, 48), (48, 32)]
    assert all(p.metres <= 1e-4 and p.logits is None for p in result.parity), result.parity
    assert result.inputs == [("images", ["batch", 3, "height", "width"])]
    assert result.outputs == [("depth", ["batch", 1, "height", "width"])]
    batch = np.random.default_rng(0).standard_normal((3, 3, 64, 80)).astype(np.float32)  # a fourth size, batch 3
    metres = OnnxModel(result.path, "cpu").depth(batch)
    expected = torch_depth(model, batch)
    np.testing.assert_allclose(metres, expected, atol=1e-4)
    assert metres.shape == (3, 1, 64, 80) and MIN_DEPTH <= metres.min() and metres.max() <= MAX_DEPTH
    assert expected.std() > 0.1  # depth varies over the images: the check above compares something


def test_depth_metadata_names_the_task_range_and_preprocessing(weights, tmp_path):
    model = build_depth(weights)
    result = export_onnx(model, tmp_path / "depth.onnx")
    props = {entry.key: entry.value for entry in onnx.load(str(result.path)).metadata_props}
    assert props["dinov3ds.task"] == "depth" and json.loads(props["dinov3ds.class_names"]) == ["depth"]
    assert json.loads(props["dinov3ds.depth"]) == {"unit": "m", "min_depth": MIN_DEPTH, "max_depth": MAX_DEPTH,
                                                   "eigen_crop": False, "depth_scale": None}  # fmt: skip
    assert json.loads(props["dinov3ds.mean"]) == list(model.backbone.mean) and int(props["dinov3ds.input_multiple"]) == 16
    assert json.loads(props["dinov3ds.inference"]) == {"flip": False, "batch_size": model.config.inference.batch_size}
    assert ServingFacts.from_props(props, "depth.onnx") == result.facts == OnnxModel(result.path, "cpu").facts
    del props["dinov3ds.depth"]  # a depth file without its range cannot be served
    with pytest.raises(UserError, match="metadata task 'depth'"):
        ServingFacts.from_props(props, "depth.onnx")


def test_depth_half_keeps_the_metres_in_float32(weights, tmp_path):
    model = build_depth(weights)
    full = export_onnx(model, tmp_path / "fp32.onnx")
    half = export_onnx(model, tmp_path / "fp16.onnx", half=True)
    assert half.facts.precision == "float16" and all(p.range_fraction <= 5e-3 for p in half.parity), half.parity
    assert 0.45 < half.path.stat().st_size / full.path.stat().st_size < 0.6
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(half.path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output]}
    einsum = next(node for node in graph.node if node.op_type == "Einsum")  # bin centres x softmax weights
    assert types[einsum.output[0]] == onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def depth_files(weights, tmp_path_factory) -> dict[str, Path]:
    """A depth checkpoint, its fp32 and fp16 files written by the CLI, images of odd sizes and their depth PNGs."""
    folder = tmp_path_factory.mktemp("depth_export")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    (folder / "truth").mkdir()
    for index, (height, width) in enumerate([(45, 61), (70, 33), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / "images" / f"{index}.png")
        truth = rng.uniform(1.0, 9.0, (height, width)) * 1000
        Image.fromarray(truth.astype(np.uint16)).save(folder / "truth" / f"{index}.png")
    files = {"ckpt": save_depth_checkpoint(build_depth(weights), folder / "depth.ckpt"), "images": folder / "images",
             "truth": folder / "truth"}  # fmt: skip
    for name, extra in (("onnx", []), ("half", ["--half"])):
        files[name] = folder / f"{name}.onnx"
        with one_thread():
            assert main(["export", "--checkpoint", str(files["ckpt"]), "--out", str(files[name]), "--device", "cpu", *extra]) == 0
    return files


def test_export_of_a_depth_checkpoint_prints_metres_and_parity_at_three_sizes(depth_files, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(depth_files["ckpt"]), "--out", str(tmp_path / "d.onnx")]) == 0
    said = capsys.readouterr().out
    assert re.search(r"wrote .*d\.onnx \([\d.]+ MB, float32, depth in metres, 0\.5 to 10 m, height and width: any "
                     r"multiple of 16\)", said), said  # fmt: skip
    assert "output depth: float32 [batch, 1, height, width] metres" in said
    assert len(re.findall(r"depth \S+e-\d+ m  \(\S+e-\d+ of max_depth\)", said)) == 3, said


def millimetres(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)).astype(np.int64) for path in sorted(folder.glob("*.depth.png"))}


def test_predict_on_the_depth_onnx_writes_the_checkpoints_millimetres(depth_files, tmp_path, capsys):
    """The same 16-bit PNGs within 1 mm (fp32: every pixel here; fp16 within its export bound), the same scores."""
    outputs, scores = {}, {}
    for name in ("ckpt", "onnx", "half"):
        out = tmp_path / name
        assert main(["predict", "--checkpoint", str(depth_files[name]), str(depth_files["images"]), "--out", str(out),
                     "--labels", str(depth_files["truth"]), "--device", "cpu", "depth.eigen_crop=false"]) == 0  # fmt: skip
        outputs[name] = millimetres(out)
        scores[name] = json.loads((out / "depth_metrics.json").read_text())
        assert (out / "0.png.depth_color.png").is_file() and (out / "depth_per_image.csv").is_file()
    reference = outputs["ckpt"]
    assert [array.shape for array in reference.values()] == [(45, 61), (70, 33), (32, 32)]
    assert np.concatenate([array.ravel() for array in reference.values()]).std() > 100  # depth varies (mm)
    for name in ("onnx", "half"):
        assert outputs[name].keys() == reference.keys()
        gaps = np.concatenate([np.abs(outputs[name][key] - reference[key]).ravel() for key in reference])
        within = float(np.mean(gaps <= 1))
        print(f"{name}: {within:.4f} of pixels within 1 mm of the checkpoint's, max {gaps.max()} mm")
        if name == "onnx":
            assert within >= 0.99 and gaps.max() <= 2, (within, gaps.max())
        else:  # fp16 features: measured 35 % within 1 mm, max 13 mm; the export bound is 5e-3 x max_depth
            assert gaps.max() <= 5e-3 * MAX_DEPTH * 1000, gaps.max()
        assert scores[name]["RMSE"] == pytest.approx(scores["ckpt"]["RMSE"], abs=2e-3)


def test_batched_depth_predict_matches_one_image_at_a_time_and_names_each_row(depth_files, tmp_path):
    """Batches group images by transformed size, so a fourth image of the first one's size is predicted second,
    out of input order: each PNG is still the model's own `predict` of its image, and the per-image CSV lists
    the images in input order, each row scoring the image it names."""
    images = shutil.copytree(depth_files["images"], tmp_path / "images")
    truths = shutil.copytree(depth_files["truth"], tmp_path / "truth")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(images / "3.png")
    Image.fromarray((rng.uniform(1.0, 9.0, (45, 61)) * 1000).astype(np.uint16)).save(truths / "3.png")
    out = tmp_path / "batched"
    assert main(["predict", "--checkpoint", str(depth_files["ckpt"]), str(images), "--out", str(out), "--labels",
                 str(truths), "--device", "cpu", "inference.batch_size=4", "depth.eigen_crop=false"]) == 0  # fmt: skip
    model = DepthEstimator.from_checkpoint(depth_files["ckpt"], device="cpu")
    listed = list(csv.DictReader((out / "depth_per_image.csv").open()))
    assert [row["image"] for row in listed] == [str(p) for p in sorted(images.glob("*.png"))]
    rows = {row["image"]: row for row in listed}
    for image in sorted(images.glob("*.png")):
        written = np.asarray(Image.open(out / f"{image.name}.depth.png")).astype(np.float64) / 1000
        alone = model.predict(Image.open(image).convert("RGB"))
        assert written.shape == alone.shape and np.abs(written - alone).max() <= 1.5e-3, image.name  # mm rounding
        truth = torch.from_numpy(load_depth(truths / image.name))
        expected = image_metrics(torch.from_numpy(written).float(), truth, min_depth=model.min_depth,
                                 max_depth=model.max_depth)["RMSE"]  # fmt: skip
        assert float(rows[str(image)]["RMSE"]) == pytest.approx(expected, abs=2e-3), image.name


def test_depth_predict_splits_a_batch_whose_bins_would_pass_the_budget(depth_files, tmp_path, monkeypatch):
    """The bins' scores are bins x H x W floats per image (315 MB for 256 bins at 480x640): a batch is split
    below PROBABILITY_BUDGET, as segmentation's class scores are."""
    images = shutil.copytree(depth_files["images"], tmp_path / "images")
    shutil.copy(images / "2.png", images / "3.png")  # two 32x32 images: one batch of 2
    seen: list[int] = []
    original = DepthEstimator.predict_depth

    def counted(self, batch, *rest):
        seen.append(len(batch))
        return original(self, batch, *rest)

    monkeypatch.setattr(DepthEstimator, "predict_depth", counted)
    argv = ["predict", "--checkpoint", str(depth_files["ckpt"]), str(images), "--device", "cpu", "inference.batch_size=4"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert sorted(seen) == [1, 1, 2]
    seen.clear()
    monkeypatch.setattr(inference_module, "PROBABILITY_BUDGET", 1)
    assert main([*argv, "--out", str(tmp_path / "split")]) == 0
    assert seen == [1, 1, 1, 1]
    assert millimetres(tmp_path / "split").keys() == millimetres(tmp_path / "whole").keys()
    for name, array in millimetres(tmp_path / "split").items():
        assert np.abs(array - millimetres(tmp_path / "whole")[name]).max() <= 1, name


def test_an_onnx_depth_file_refuses_trained_settings_and_serves_without_torch(depth_files, tmp_path, capsys):
    argv = ["predict", "--checkpoint", str(depth_files["onnx"]), str(depth_files["images"]), "--out", str(tmp_path / "o")]
    assert main([*argv, "depth.max_depth=20"]) == 2
    error = capsys.readouterr().err.strip()
    assert "'depth.max_depth' is fixed in the exported file" in error and len(error.splitlines()) == 1
    code = ("import sys; sys.modules['torch'] = None\n"
            "from dinov3ds.deploy.runtime import OnnxModel\nimport numpy as np\n"
            f"m = OnnxModel({str(depth_files['onnx'])!r}, 'cpu')\n"
            "d = m.depth(np.zeros((2, 3, 32, 64), np.float32))\n"
            "print(d.shape, d.dtype, m.facts.depth['unit'], m.facts.depth['max_depth'])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"(2, 1, 32, 64) float32 m {MAX_DEPTH}"


# The README serving example's depth branch (numpy, Pillow and onnxruntime only), run as a user would.
SERVING_DEPTH = """
import json

import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
mean, std = (np.array(json.loads(meta[key]), np.float32) for key in ("dinov3ds.mean", "dinov3ds.std"))
multiple, fixed = int(meta["dinov3ds.input_multiple"]), json.loads(meta["dinov3ds.input_size"])
image = Image.open("photo.jpg").convert("RGB")
height, width = fixed or (max(multiple, round(side / multiple) * multiple) for side in image.size[::-1])
pixels = np.asarray(image.resize((width, height), Image.BILINEAR), np.float32) / 255  # RGB, 0-1
batch = ((pixels - mean) / std).transpose(2, 0, 1)[None]  # [1, 3, height, width]
output = session.run(None, {"images": batch})[0]
if meta["dinov3ds.task"] == "depth":  # metres [1, 1, height, width], then at the photo's size as 16-bit mm
    metres = np.asarray(Image.fromarray(output[0, 0]).resize(image.size, Image.BILINEAR))
    Image.fromarray(np.clip(np.round(metres * 1000), 0, 65535).astype(np.uint16)).save("depth.png")
"""


def test_serving_a_depth_file_needs_neither_torch_nor_dinov3ds(depth_files, tmp_path):
    (tmp_path / "model.onnx").symlink_to(depth_files["onnx"])
    Image.open(depth_files["images"] / "0.png").save(tmp_path / "photo.jpg")
    blocked = "import sys; sys.modules.update(torch=None, dinov3ds=None)\n"
    done = subprocess.run([sys.executable, "-c", blocked + SERVING_DEPTH], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    written = np.asarray(Image.open(tmp_path / "depth.png"))
    assert written.dtype == np.uint16 and written.shape == (45, 61)
    assert MIN_DEPTH * 1000 <= written.min() and written.max() <= MAX_DEPTH * 1000


# -- check-data on depth folders (depth_folder, and nyu's converted layout)
def test_check_data_lists_every_depth_problem_and_each_splits_range(tmp_path, capsys):
    root = make_depth_folder(tmp_path / "scenes", train=4, val=3)
    argv = ["check-data", "--config", "depth_nyu_linear", f"data.root={root}", "--workers", "2"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    train = np.concatenate([load_depth(path).ravel() for path in sorted((root / "train" / "depth").glob("*.png"))])
    known = train[train > 0]
    assert (f"train: depth {known.min():.3g} to {known.max():.3g} m over valid pixels; {known.size / train.size:.1%} "
            "valid (0 < depth <= max_depth 10 m), 0.0% beyond max_depth") in said.splitlines()  # fmt: skip
    assert "NYU's Eigen split has 795 train / 654 test images" in said  # a config for nyu, 4 / 3 images here
    assert f"{root}: image/depth pairs checked (train: 4, val: 3); no problems" in said
    Image.fromarray(np.ones((8, 8), np.uint16)).save(root / "train" / "depth" / "000.png")
    (root / "train" / "depth" / "001.png").unlink()
    Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "train" / "depth" / "002.png")
    (root / "val" / "depth" / "000.png").unlink()
    np.save(root / "val" / "depth" / "000.npy", np.ones((32, 32, 3), np.float32))
    np.save(root / "val" / "depth" / "001.npy", np.ones((32, 32), np.float32))
    Image.fromarray(np.ones((32, 32), np.uint16)).save(root / "val" / "depth" / "stray.png")
    assert main(argv) == 2
    captured = capsys.readouterr()
    expected = [r"image \S+train/images/001\.png has no depth file \S+train/depth/001\.png \(or \.npy\)",
                r"depth file \S+train/depth/000\.png is 8x8 but image \S+000\.png is 32x32",
                r"depth file \S+train/depth/002\.png is an L PNG, not 16-bit",
                r"depth file \S+val/depth/000\.npy holds float32 of shape \(32, 32, 3\)",
                r"depth file \S+val/depth/001\.npy is unused: \S+val/depth/001\.png is read for image",
                r"depth file \S+val/depth/stray\.png has no image under"]  # fmt: skip
    problems = captured.out.splitlines()[: len(expected)]  # then the ranges and the count
    assert all(any(re.search(pattern, line) for line in problems) for pattern in expected), problems
    assert captured.err.strip() == f"dinov3ds: error: 6 problems in {root} (listed above); fix or remove those files"


def test_check_data_names_depth_in_the_wrong_unit(tmp_path, capsys):
    root = make_depth_folder(tmp_path / "scenes", train=2, val=1)
    assert main(["check-data", "--config", "depth_nyu_dpt", f"data.root={root}", "depth.depth_scale=1"]) == 2
    said = capsys.readouterr().out  # millimetres read as metres: everything lies beyond 10 m
    assert "train: depth none over valid pixels; 0.0% valid" in said
    assert "split train: no pixel has depth within (0, 10] m; check depth.depth_scale" in said


# -- a dpt depth head that learns, and the run report of its folder
DPT_SMALL = "{features: 16, reassemble_channels: [8, 16, 32, 32]}"  # 100k parameters (256 and Meta's widths: 13M)


@pytest.fixture(scope="module")
def dpt_run(tmp_path_factory) -> tuple[Path, Path]:
    """A dpt depth head trained on 32 generated scenes (8 epochs of 4 steps), then evaluated: (run, eval folder)."""
    base = tmp_path_factory.mktemp("dpt")
    root = make_depth_folder(base / "scenes", train=32, val=4)
    (base / "depth.yaml").write_text("task: depth\n")
    run = base / "run"
    with one_thread():
        assert main(["train", "--config", str(base / "depth.yaml"), *tiny(
            "data.dataset=depth_folder", f"data.root={root}", f"output_dir={run}", "head.name=dpt",
            f"head.options={DPT_SMALL}", "data.batch_size=8", "optim.lr=1e-2", "trainer.max_epochs=8",
            "trainer.check_val_every_n_epoch=8", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.logger=[csv]")]) == 0  # fmt: skip
        assert main(["eval", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(base / "eval")]) == 0
    return run, base / "eval"


def test_a_dpt_depth_head_learns_depth_from_generated_scenes(dpt_run):
    run, _ = dpt_run
    config = load_config(run / "config.yaml")
    root = Path(config.data.root)
    train = np.concatenate([load_depth(path).ravel() for path in sorted((root / "train" / "depth").glob("*.png"))])
    val = np.concatenate([load_depth(path).ravel() for path in sorted((root / "val" / "depth").glob("*.png"))])
    baseline = float(np.sqrt(np.mean((val[val > 0] - train[train > 0].mean()) ** 2)))
    rmse = json.loads((run / "val_metrics.json").read_text())["RMSE"]
    print(f"dpt: val RMSE {rmse:.3f} m vs {baseline:.3f} m predicting the training mean")  # seeds 0-3: 0.37-0.50 of it
    assert config.head.name == "dpt" and rmse < 0.6 * baseline, (rmse, baseline)


def test_the_report_of_a_depth_run_shows_its_metrics_curve_and_images(dpt_run, tmp_path, capsys):
    run, evaluated = dpt_run
    assert main(["report", str(run), "--out", str(tmp_path / "run.html")]) == 0
    page = (tmp_path / "run.html").read_text()
    metrics = json.loads((run / "val_metrics.json").read_text())
    for title in ("Best validation", "Last validation", "Progress", "Per image (worst RMSE first; metres)"):
        assert f"<h2>{title}</h2>" in page, title
    for name in ("RMSE", "RMSE_log", "AbsRel", "SqRel", "log10", "d1", "d2", "d3"):
        assert f"<td>{name}</td><td>{metrics[name]:.4f}</td>" in page, name
    assert main_metric(read_metrics(run / "metrics.csv")) == "val/RMSE"  # the progress figure's right axis
    rows = read_run(run).per_image[1]
    assert len(rows) == 4 and [float(row[1]) for row in rows] == sorted((float(row[1]) for row in rows), reverse=True)
    assert main(["report", str(evaluated), "--out", str(tmp_path / "eval.html")]) == 0
    page = (tmp_path / "eval.html").read_text()
    assert "<h2>Evaluation</h2>" in page and "task depth" in page and "Per image (worst RMSE first" in page
