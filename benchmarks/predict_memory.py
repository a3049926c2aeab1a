"""Peak memory of segmentation predict on one large photo, 1 to 24 megapixels, with a 150-class head.

Before, the probabilities of every class were resized to the full image (6000 x 4000 x 150 float32 = 14.4 GB)
and the process died. Now the labels are made in bands of rows (`models.inference.labels_at_size`): memory
is the network's input, one band and the label map, whatever the photo's size.

Each size runs `Segmenter.predict` in a fresh interpreter (random-weight ViT-S/16 cut to 1 block, linear
head, 150 classes, `eval_size` 256 so the network sees the same small input every time). Baseline = RSS with
the model built and the decoded photo (a PIL image, as from disk) in memory, plus the int64 label map the call returns; the high-water
mark is reset there (`/proc/self/clear_refs`), so "peak beyond baseline" is what prediction itself holds.
It must stay flat: within 25 % of the 1-megapixel photo's at every size (the allocator moves a few MiB).

Run from the repository root: `python benchmarks/predict_memory.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

TOLERANCE = 0.25
SIZES = [(1000, 1000), (3000, 2000), (6000, 4000)]  # width, height: 1, 6 and 24 megapixels

CHILD = r"""
import gc, json, sys, time
import numpy as np
import torch

def status():
    with open("/proc/self/status") as handle:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in handle) if k in ("VmRSS", "VmHWM")}

width, height = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(2)
from dinov3ds.config import config_from_dict
from dinov3ds.models.tasks import Segmenter, backbone_from_config

names = [f"class_{i}" for i in range(150)]
config = config_from_dict({"task": "segmentation", "backbone": {"name": "vits16", "weights": "random",
                           "overrides": {"depth": 1}}, "data": {"class_names": names, "eval_size": 256},
                           "head": {"name": "linear"}})
model = Segmenter(backbone_from_config(config), 150, config, names).eval()
from PIL import Image
pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
image = Image.fromarray(pixels)  # as `predict` gets a photo from disk (load_image gives a PIL image)
del pixels
labels_bytes = height * width * 8
gc.collect()
baseline = status()["VmRSS"] + labels_bytes
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
start = time.perf_counter()
labels = model.predict(image)
seconds = time.perf_counter() - start
assert labels.shape == (height, width)
peak = status()["VmHWM"]
print(json.dumps({"megapixels": width * height / 1e6, "image_bytes": width * height * 3, "labels_bytes": labels_bytes,
                  "baseline_bytes": baseline, "peak_bytes": peak, "beyond_baseline_bytes": peak - baseline,
                  "seconds": seconds,
                  "full_size_probabilities_bytes": 150 * height * width * 4}))
"""


def measure(width: int, height: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(width), str(height)], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode:
        raise SystemExit(f"{width}x{height} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    rows, records = [], []
    for width, height in SIZES:
        record = measure(width, height)
        records.append(record)
        mib = 2**20
        rows.append([f"{width}x{height}", round(record["megapixels"], 1), round(record["full_size_probabilities_bytes"] / mib),
                     round(record["beyond_baseline_bytes"] / mib, 1), round(record["peak_bytes"] / mib),
                     round(record["seconds"], 2)])  # fmt: skip
    first = max(records[0]["beyond_baseline_bytes"], 1)
    flat = all(r["beyond_baseline_bytes"] <= first * (1 + TOLERANCE) + 16 * 2**20 for r in records)
    print(markdown_table(["image", "MP", "all-class map would be (MiB)", "peak beyond image+labels (MiB)",
                          "peak RSS (MiB)", "seconds"], rows))  # fmt: skip
    print(f"flat within {TOLERANCE:.0%} (+16 MiB allocator slack): {flat}")
    write_result("predict_memory", {"records": records, "flat": flat, "tolerance": TOLERANCE})
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
