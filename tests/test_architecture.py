"""The package's shape: layers import only downwards, no import cycle, small modules that say their job,
and a new head is one file plus one registry line (trained here through the CLI path)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_segmentation_folder
from dinov3ds.heads import HEADS, SegmentationHead
from dinov3ds.models.tasks import Segmenter
from tests.conftest import tiny

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dinov3ds"
MAX_LINES = 350

# Rank of each layer: a module imports its own layer's modules or lower-ranked layers only. `data` and
# `heads` share a rank and must not import each other (datasets know nothing of models, and heads nothing
# of datasets).
# `report` reads run folders (files, no model) and draws with viz: training and commands call it, never the reverse.
LAYERS = {"foundation": 0, "data": 1, "heads": 1, "models": 2, "report": 2, "training": 3, "deploy": 3, "commands": 4,
          "entry": 5}  # fmt: skip
FOUNDATION = {"dinov3ds", "dinov3ds.errors", "dinov3ds.config", "dinov3ds.metrics", "dinov3ds.viz"}
MAX_ROOT_MODULES = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if ".".join(module.split(".")[:2]) in FOUNDATION:
        return "foundation"
    if module in ("dinov3ds.cli", "dinov3ds.__main__"):
        return "entry"
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """Every dinov3ds module → the dinov3ds modules it imports (function-local imports included)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dinov3ds":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dinov3ds"}
        graph[module_name(path)] = found
    return graph


def test_every_module_is_in_a_known_layer():
    assert {layer(module) for module in imports()} <= set(LAYERS)


def test_layers_import_only_downwards():
    upward = []
    for module, imported in imports().items():
        for target in imported:
            mine, theirs = layer(module), layer(target)
            if mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not upward, "\n".join(upward)


def test_the_package_root_holds_few_modules():
    """Subjects with more than one module are packages: the root stays a short list a reader takes in at once."""
    root = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_import_cycle():
    graph = {module: {t for t in targets if t != module} for module, targets in imports().items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_modules_are_small_and_open_with_their_job():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES:
            problems.append(f"{path.name}: {lines} lines > {MAX_LINES}")
        docstring = ast.get_docstring(ast.parse(text))
        if path.name != "__main__.py" and not (docstring and docstring.splitlines()[0].strip()):
            problems.append(f"{path.relative_to(PACKAGE)}: no one-line docstring saying its job")
    assert not problems, "\n".join(problems)


class CentreHead(SegmentationHead):
    """A throwaway head defined in a test: 1x1 conv on the last tap, bilinear up. Needs sides that are
    multiples of 32, to check that a head's own input multiple reaches the transforms."""

    input_multiple = 32

    def __init__(self, in_channels: list[int], strides: list[int], num_classes: int, *, width: int = 8) -> None:
        super().__init__(in_channels, strides, num_classes)
        self.project = nn.Sequential(nn.Conv2d(in_channels[-1], width, 1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, features: list[Tensor], image: Tensor) -> Tensor:
        logits = self.project(features[-1])
        return nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def test_a_new_head_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(HEADS, "centre", CentreHead)  # the one registry line
    root = make_segmentation_folder(tmp_path / "data", train=4, val=2, size=(40, 56))
    run = tmp_path / "run"
    args = ["train", *tiny(), "task=segmentation", "data.dataset=segmentation_folder", f"data.root={root}",
            "data.num_classes=3", "data.batch_size=2", "data.eval_size=40", "head.name=centre", "head.options={width: 4}",
            "trainer.max_epochs=1", f"output_dir={run}"]  # fmt: skip
    assert main(args) == 0
    model = Segmenter.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.head, CentreHead) and model.head.project[0].out_channels == 4
    assert model.input_multiple == 32
    # The eval transform rounds 40x56 to multiples of 32 and the label map comes back at the image's size.
    labels = model.predict(torch.zeros(40, 56, 3, dtype=torch.uint8).numpy())
    assert labels.shape == (40, 56)
    with pytest.raises(Exception, match="head 'centre' is unknown"):
        monkeypatch.delitem(HEADS, "centre")
        Segmenter.from_checkpoint(run / "checkpoints" / "last.ckpt")


def test_every_package_folder_has_an_init_so_it_is_installed():
    """setuptools' find_packages ships only folders with an __init__.py: a folder without one works from a
    checkout (editable install) but is missing from a wheel."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")} - {PACKAGE}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").is_file()) == []
