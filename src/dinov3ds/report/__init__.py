"""The run report: what `train` and `eval` leave in a folder, as one self-contained HTML page.

`reading` reads a run or eval folder (no model, no torch), `figures` draws its pictures, `html` writes
report.html, `compare` one page over several runs. Training and the commands call this; it calls `viz`.
"""

from dinov3ds.report.compare import compare_runs
from dinov3ds.report.html import write_report
from dinov3ds.report.reading import read_run

__all__ = ["compare_runs", "read_run", "write_report"]
