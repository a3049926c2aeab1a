"""How long `dinov3ds demo` takes from a clean folder (no data, no feature cache), as a new user runs it.

    python benchmarks/demo_time.py            # writes benchmarks/results/demo_time.json

Records the wall time, the CPU time of the demo process, the cores and the load average around the run (the
README's demo time is this wall time; on a shared machine the load says how much of it was waiting).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        environment = {**os.environ, "DINOV3DS_CACHE": str(Path(folder) / "cache")}
        load_before = os.getloadavg()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dinov3ds", "demo", "--out", str(Path(folder) / "demo")], cwd=folder,
                       env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {"command": "dinov3ds demo (clean folder, empty cache, random weights)", "wall_seconds": round(wall, 1),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "cores": os.cpu_count(),
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    print(record)
    write_result("demo_time", record)


if __name__ == "__main__":
    main()
