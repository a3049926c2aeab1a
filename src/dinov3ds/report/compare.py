"""`dinov3ds report RUN_A RUN_B ...`: one page comparing runs: what differs in their configs, their curves
overlaid, their metrics side by side. It reads the runs' folders and writes nothing but the page.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from dinov3ds.errors import UserError
from dinov3ds.report.figures import overlaid_curves
from dinov3ds.report.html import e, image_tag, page, table
from dinov3ds.report.reading import RunView, flatten, read_run


def _names(views: list[RunView]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [view.name for view in views]
    return [str(view.folder) if names.count(name) > 1 else name for view, name in zip(views, names)]


def config_differences(views: list[RunView]) -> tuple[list[str], list[list[object]]]:
    """Dotted config keys whose values differ between the runs (output_dir left out: it always differs)."""
    flat = [flatten(view.config) for view in views]
    keys = sorted({key for tree in flat for key in tree} - {"output_dir"})
    rows = [[key, *(_shown(tree.get(key, "—")) for tree in flat)] for key in keys
            if len({repr(tree.get(key, "—")) for tree in flat}) > 1]  # fmt: skip
    return ["key", *_names(views)], rows


def _shown(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def metric_table(views: list[RunView]) -> tuple[list[str], list[list[object]]]:
    """Every scalar metric any run has (the best validation's where the run kept it, else the last or the
    eval's), one column per run."""
    found = []
    for view in views:
        best = (view.info.get("best") or {}).get("metrics") or {}
        scalars = {k.removeprefix("val/"): v for k, v in best.items()} or view.metrics
        found.append({k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys = sorted({key for values in found for key in values})
    rows = [[key, *(_number(values.get(key)) for values in found)] for key in keys]
    return ["metric", *_names(views)], rows


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def compare_runs(folders: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write the comparison of `folders` to `out` (an .html file); nothing else is written anywhere."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: name an .html file for the comparison page")
    if out.is_dir() or (out.exists() and not overwrite):
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or name another file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it or name another file")
    views = [read_run(folder) for folder in folders]
    names = _names(views)
    buffer = io.BytesIO()
    overlaid_curves({name: view.folder / "metrics.csv" for name, view in zip(names, views)}, buffer)
    header, rows = metric_table(views)
    differ_header, differ_rows = config_differences(views)
    sections = [f"<h1>Comparing {len(views)} runs</h1>",
                "<p class=meta>" + " · ".join(e(view.folder.resolve()) for view in views) + "</p>",
                "<h2>Metrics</h2><p class=meta>each run's best validation (an eval: its results)</p>", table(header, rows),
                "<h2>Curves</h2>" + image_tag(buffer.getvalue(), "curves of every run"),
                "<h2>Config differences</h2>",
                table(differ_header, differ_rows) if differ_rows else "<p>The configs are the same (output_dir aside).</p>"]  # fmt: skip
    temporary = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        temporary.write_text(page("dinov3ds: " + " vs ".join(names), sections), encoding="utf-8")
        os.replace(temporary, out)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {out} ({error.strerror}); name a writable --out") from None
    return out
