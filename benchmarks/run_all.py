"""Run every benchmark script in this folder, one after another, with quick settings.

Every `benchmarks/*.py` except helpers (names starting with `_`) and this file runs in its own interpreter,
sequentially (parallel runs would time each other). Scripts that accept `--quick` get it; the others run
with their defaults, which are sized for a quick run. Each script prints its markdown table and writes
`benchmarks/results/<name>.json` with the machine description.

Usage, from the repository root:

    python benchmarks/run_all.py                 # all scripts
    python benchmarks/run_all.py backbone heads  # only these
    python benchmarks/run_all.py --list          # what would run

At the end a summary table gives each script's exit status and wall time and where its results are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="script names (without .py) to run; default: all")
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = parser.parse_args()
    chosen = [p for p in scripts() if not args.only or p.stem in args.only]
    unknown = set(args.only) - {p.stem for p in chosen}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: "
                     f"{', '.join(p.stem for p in scripts())}")  # fmt: skip
    if args.list:
        print("\n".join(p.stem for p in chosen))
        return 0

    from _common import RESULTS_DIR, markdown_table

    summary = []
    for script in chosen:
        command = [sys.executable, str(script)]
        if '"--quick"' in script.read_text():
            command.append("--quick")
        print(f"\n# {script.name}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT).returncode
        seconds = time.perf_counter() - start
        results = sorted(RESULTS_DIR.glob(f"{script.stem}*.json"))
        summary.append([script.name, "ok" if code == 0 else f"exit {code}", round(seconds, 1),
                        ", ".join(str(p.relative_to(ROOT)) for p in results) or "-"])  # fmt: skip
    print("\n# Summary\n")
    print(markdown_table(["script", "status", "wall s", "results"], summary))
    print(f"\nJSON results (with the machine description): {RESULTS_DIR.relative_to(ROOT)}/")
    return 0 if all(row[1] == "ok" for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
