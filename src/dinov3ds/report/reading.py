"""A run folder as the report sees it: what `train` or `eval` left there, read without a model or torch.

A train run holds config.yaml, metrics.csv, run_info.json and the last validation's val_* files; an eval
folder holds eval_info.json and the eval_* files. Whatever is missing (a run still starting, an older run)
is simply left out of the page.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dinov3ds.errors import UserError

# Pictures a run or an eval leaves, in the order the page shows them: (file, title).
PICTURES = (
    ("curves.png", "progress"),
    ("{prefix}_confusion_matrix.png", "confusion matrix (rows: truth, row-normalised)"),
    ("{prefix}_predictions.png", "best and worst validation images"),
    ("{prefix}_slices.png", "slices of the worst case: axial, coronal, sagittal"),
)


@dataclass
class RunView:
    folder: Path
    kind: str  # "train" or "eval"
    prefix: str  # "val" or "eval": the metric files' prefix
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # run_info.json / eval_info.json
    metrics: dict = field(default_factory=dict)  # <prefix>_metrics.json
    per_class: tuple[list[str], list[list[str]]] | None = None  # header, rows (worst first)
    per_case: tuple[list[str], list[list[str]]] | None = None  # volumes: header, rows (worst Dice first)
    per_image: tuple[list[str], list[list[str]]] | None = None  # depth: header, rows (worst RMSE first)
    pictures: list[tuple[str, Path | bytes]] = field(default_factory=list)  # (title, file or PNG bytes)

    @property
    def name(self) -> str:
        return self.folder.resolve().name


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}); rerun the command that wrote it") from None


def _csv(path: Path) -> tuple[list[str], list[list[str]]] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return (rows[0], rows[1:]) if rows else None


def number(text: str) -> float:
    """A cell as a float; NaN for an empty, `nan` or non-numeric cell."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def worst_first(table: tuple[list[str], list[list[str]]], column: int,
                higher_is_worse: bool = False) -> tuple[list[str], list[list[str]]]:  # fmt: skip
    """Rows by the value in `column`, lowest first (highest first for an error such as RMSE); undefined values
    (absent classes) last."""
    header, rows = table
    sign = -1 if higher_is_worse else 1
    return header, sorted(rows, key=lambda row: (math.isnan(number(row[column])), sign * number(row[column])))


def read_run(folder: str | Path) -> RunView:
    """The run or eval folder's files; a folder that holds neither is refused in one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; name a train output_dir or an eval --out folder")
    if (folder / "eval_info.json").is_file():
        view = RunView(folder, "eval", "eval", info=_json(folder / "eval_info.json"))
        view.config = view.info.get("config", {})
    elif (folder / "config.yaml").is_file():
        view = RunView(folder, "train", "val", info=_json(folder / "run_info.json"))
        try:
            view.config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{folder / 'config.yaml'} cannot be read ({error}); it is the run's config") from None
    else:
        raise UserError(f"{folder} holds no dinov3ds run (no config.yaml, no eval_info.json); name a train "
                        "output_dir or an eval --out folder")  # fmt: skip
    prefix = view.prefix
    view.metrics = _json(folder / f"{prefix}_metrics.json")
    accuracy, iou = _csv(folder / f"{prefix}_per_class_accuracy.csv"), _csv(folder / f"{prefix}_per_class_iou.csv")
    if accuracy:
        view.per_class = worst_first(accuracy, 1)
    elif iou:
        view.per_class = worst_first(iou, 1)
    elif view.metrics.get("per_class"):  # volumes: the means per class from <prefix>_metrics.json
        rows = [[name, *(_cell(values.get(m)) for m in ("dice", "iou", "hd95", "nsd"))]
                for name, values in view.metrics["per_class"].items()]  # fmt: skip
        view.per_class = worst_first((["class", "Dice", "IoU", "HD95 mm", "NSD"], rows), 1)
    cases = _csv(folder / f"{prefix}_per_case.csv")
    if cases:
        view.per_case = worst_first(cases, 2)
    images = _csv(folder / f"{prefix}_per_image_depth.csv")  # image, RMSE, ...
    if images:
        view.per_image = worst_first(images, 1, higher_is_worse=True)
    for name, title in PICTURES:
        path = folder / name.format(prefix=prefix)
        if path.is_file():
            view.pictures.append((title, path))
    return view


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys → values (lists and scalars kept whole)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
