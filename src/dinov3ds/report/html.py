"""The run report: one self-contained HTML page per run or eval folder (report.html).

Pictures are embedded as base64 PNG, the styles inline; the page loads nothing (its Content-Security-Policy
forbids it) and reads without JavaScript: tables come sorted worst first, and a few inline lines make their
columns sortable by a click where scripts run. `write_report(folder)` rebuilds it from the folder's files.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from pathlib import Path

import yaml

from dinov3ds.errors import UserError
from dinov3ds.report.figures import progress_figure, read_metrics
from dinov3ds.report.reading import RunView, read_run

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d1d1f;line-height:1.4}h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:1.6em}.meta{color:#555}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2;cursor:pointer}
td:first-child,th:first-child{text-align:left}tr.winner td{background:#e3f5e1;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:.5em 0;border:1px solid #ddd}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}.scroll{max-height:32em;overflow:auto}
.tag{display:inline-block;padding:0 .5em;border-radius:.6em;background:#eee;font-size:.85em}
"""
# Progressive enhancement: a click on a header sorts by that column (numbers as numbers); without scripts the
# tables stay as written, worst first.
SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th,col){th.addEventListener('click',function(){
var body=th.closest('table').tBodies[0],rows=Array.from(body.rows),up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';
function key(r){var t=r.cells[col].textContent.trim(),n=parseFloat(t);return isNaN(n)?t:n;}
rows.sort(function(a,b){var x=key(a),y=key(b);if(typeof x!==typeof y)return typeof x==='number'?-1:1;
return (x<y?-1:x>y?1:0)*(up?1:-1);});rows.forEach(function(r){body.appendChild(r);});});});
"""
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def image_tag(data: bytes | Path, alt: str) -> str:
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{base64.b64encode(raw).decode("ascii")}">'


def table(header: list[str], rows: list[list[object]], *, winner: int | None = None, sortable: bool = True) -> str:
    head = "".join(f"<th>{e(cell)}</th>" for cell in header) if any(header) else ""
    body = "".join(
        f'<tr{" class=winner" if index == winner else ""}>' + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
        for index, row in enumerate(rows)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="{"sortable" if sortable else ""}">{thead}<tbody>{body}</tbody></table>'


def page(title: str, sections: list[str]) -> str:
    """The whole document around `sections` (already HTML)."""
    made = datetime.datetime.now().isoformat(timespec="seconds")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{e(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(sections)}"
            f'<p class="meta">written by dinov3ds at {made}</p><script>{SORT_SCRIPT}</script></body></html>\n')  # fmt: skip


def _scalars(metrics: dict) -> list[list[object]]:
    return [[key, f"{value:.4f}" if isinstance(value, float) else value] for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]  # fmt: skip


def _summary(view: RunView) -> str:
    info, config = view.info, view.config
    data, backbone = config.get("data", {}), config.get("backbone", {})
    state = info.get("state", "evaluated" if view.kind == "eval" else "unknown")
    lines = [f"<h1>{e(view.name)} <span class=tag>{e(state)}</span></h1>",
             f'<p class="meta">{e(view.kind)} · task {e(config.get("task", "?"))} · dataset {e(data.get("dataset", "?"))} '
             f'({e(data.get("root", "?"))}) · folder {e(view.folder.resolve())}</p>']  # fmt: skip
    identity = info.get("backbone") or {}
    rows = [["variant", identity.get("name", backbone.get("name", "?"))],
            ["weights", identity.get("source") or identity.get("weights") or backbone.get("weights") or "default"]]  # fmt: skip
    rows += [[key, value] for key, value in identity.items() if key not in ("name", "source", "weights")]
    trainable = info.get("trainable")
    if trainable:
        rows += [["trainable in the head", f"{trainable['head']:,}"], ["trainable in the backbone",
                 f"{trainable['backbone']:,} ({trainable.get('mode', '')})"]]  # fmt: skip
    if info.get("checkpoint"):
        rows.append(["checkpoint", info["checkpoint"]])
    lines += ["<h2>Backbone and weights</h2>", table(["", ""], rows, sortable=False)]
    best = info.get("best") or {}
    if best.get("metrics"):
        lines.append(f"<h2>Best validation</h2><p>epoch {e(best.get('epoch'))}, step {e(best.get('step'))}"
                     f"{' (checkpoints/best.ckpt)' if view.kind == 'train' else ''}</p>")  # fmt: skip
        lines.append(table(["metric", "value"], _scalars(best["metrics"]), sortable=False))
    if view.metrics:
        title = "Last validation" if view.kind == "train" else "Evaluation"
        lines += [f"<h2>{title}</h2>", table(["metric", "value"], _scalars(view.metrics), sortable=False)]
    return "".join(lines)


def probe_grid_rows(view: RunView) -> tuple[list[str], list[list[object]], int | None] | None:
    """The probe grid's heads (top-1 at the last validation and at their best), the winner: the head the best
    checkpoint holds (`best.probe` in run_info.json)."""
    series = read_metrics(view.folder / "metrics.csv")
    tags = sorted(key.removeprefix("val/top1_") for key in series if key.startswith("val/top1_"))
    if not tags:
        return None
    probe = (view.info.get("best") or {}).get("probe") or {}
    rows, winner = [], None
    for tag in tags:
        parts = dict(_tag_part(part) for part in tag.split("_"))
        values = [point[-1] for point in series[f"val/top1_{tag}"]]
        pooling = parts.get("pooling", view.config.get("head", {}).get("pooling", ""))
        last = int(parts.get("last", view.config.get("head", {}).get("last_blocks", 1)))
        lr = float(parts.get("lr", "nan"))
        if probe and (probe.get("pooling"), int(probe.get("last_blocks", 0)), float(probe.get("lr", 0))) == (pooling, last, lr):
            winner = len(rows)
        rows.append([tag, pooling, last, f"{lr:g}", f"{100 * values[-1]:.2f}", f"{100 * max(values):.2f}"])
    return ["head", "pooling", "last blocks", "lr", "top-1 % (last)", "top-1 % (best)"], rows, winner


def _tag_part(part: str) -> tuple[str, str]:
    if part.startswith("lr"):
        return "lr", part[2:]
    if part.startswith("last"):
        return "last", part[4:]
    return "pooling", part


def render(view: RunView) -> str:
    sections = [_summary(view)]
    pictures = dict((title, path) for title, path in view.pictures)
    if "progress" in pictures:
        sections.append("<h2>Progress</h2>" + image_tag(pictures.pop("progress"), "progress"))
    if view.per_class:
        header, rows = view.per_class
        sections.append("<h2>Per class (worst first)</h2><div class=scroll>" + table(header, rows) + "</div>")
    grid = probe_grid_rows(view) if view.kind == "train" else None
    if grid:
        header, rows, winner = grid
        sections.append("<h2>Probe grid</h2><p>The highlighted head is the one in checkpoints/best.ckpt.</p>"
                        + table(header, rows, winner=winner))  # fmt: skip
    if view.per_case:
        header, rows = view.per_case
        sections.append("<h2>Per case (worst Dice first)</h2><div class=scroll>" + table(header, rows) + "</div>")
    if view.per_image:
        header, rows = view.per_image
        sections.append("<h2>Per image (worst RMSE first; metres)</h2><div class=scroll>" + table(header, rows) + "</div>")
    for title, path in pictures.items():
        sections.append(f"<h2>{e(title[0].upper() + title[1:])}</h2>" + image_tag(path, title))
    if view.config:
        text = yaml.safe_dump(view.config, sort_keys=False)
        sections.append(f"<h2>Config</h2><details><summary>the resolved config</summary><pre>{e(text)}</pre></details>")
    files = sorted(p.name for p in view.folder.iterdir() if not p.name.startswith("."))
    sections.append("<h2>Files</h2><p class=meta>" + " · ".join(e(name) for name in files) + "</p>")
    return page(f"dinov3ds {view.kind}: {view.name}", sections)


def write_report(folder: str | Path, out: str | Path | None = None, state: str | None = None) -> Path:
    """Rebuild the report of `folder` from its files into `out` (default `folder`/report.html, where a train
    run's curves.png is redrawn too; elsewhere nothing but the page is written). `state` (running, finished)
    is shown in the page. Written under a private name and renamed: never half a page."""
    folder = Path(folder)
    target = Path(out) if out is not None else folder / "report.html"
    view = read_run(folder)
    if view.kind == "train" and read_metrics(folder / "metrics.csv"):
        if out is None:
            progress_figure(folder / "metrics.csv", folder / "curves.png")
            view = read_run(folder)
        else:
            buffer = io.BytesIO()
            progress_figure(folder / "metrics.csv", buffer)
            view.pictures = [("progress", buffer.getvalue()), *(p for p in view.pictures if p[0] != "progress")]
    if state:
        view.info["state"] = state
    temporary = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        temporary.write_text(render(view), encoding="utf-8")
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {target} ({error.strerror}); free disk space or fix the folder") from None
    return target

