"""Shared helpers for benchmark scripts: where numbers came from, a markdown table, and a JSON record.

A benchmark number is only comparable with the machine description next to it, so every result file
carries one.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def cpu_model() -> str:
    """CPU model from /proc/cpuinfo (Linux), else whatever platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, memory, Python/torch/timm versions and GPU name: enough to tell two runs apart."""
    import torch

    info: dict = {
        "cpu": cpu_model(),
        "cores_visible": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numeric columns right-aligned, floats printed as given (round them first)."""

    def is_number(value: object) -> bool:
        try:
            float(str(value).replace(",", ""))
        except ValueError:
            return False
        return True

    def cell(value: object) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    numeric = [all(is_number(row[i]) for row in rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def write_result(name: str, payload: dict) -> Path:
    """Write `benchmarks/results/<name>.json` with the machine description and a UTC timestamp."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record |= {"machine": machine(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
