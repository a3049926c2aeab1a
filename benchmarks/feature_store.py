"""The feature store at ImageNet scale on one machine: build time, one probe epoch, peak RSS and size, by rows.

A stand-in backbone (one block of width 768 returning seeded random tokens, so no image is decoded and no
network runs) feeds the real store code (`dinov3ds.training.feature_cache.build_store`, `StoredFeatures`):
each row stores the CLS token and the patch mean, 2 x 768 = 1,536 values, in float16. For N = 10^4, 10^5
and 10^6 rows, in a fresh interpreter each: build the store, then one epoch of a linear probe (1,000 classes,
batch 1,024, shuffled) reading it. Checks: peak RSS at the largest N within 1.5x of the smallest, and the
shard bytes equal rows x 1,536 x 2 plus at most 1 %.

Run from the repository root: `python benchmarks/feature_store.py` (about 4 min and 3.1 GB of disk in /tmp
for 10^6 rows); `--rows 10000 100000` for fewer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

WIDTH, CLASSES, BATCH = 768, 1000, 1024

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader, Dataset
from dinov3ds.config import load_config
from dinov3ds.training import feature_cache

rows, width, classes, batch, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
torch.set_num_threads(2)

def vmhwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

class StandInBackbone:
    depth, identity, dtype, device = 1, {"name": "stand-in"}, torch.float32, torch.device("cpu")
    def get_intermediate_layers(self, images, layers, norm=True):
        generator = torch.Generator().manual_seed(int(images[0, 0]))
        tokens = torch.randn(len(images), width, generator=generator)
        return [(torch.randn(len(images), width, 2, 2, generator=generator), tokens)]

class StandInModel:
    backbone, layers, pooling, device = StandInBackbone(), [0], "cls+avg", torch.device("cpu")

class Rows(Dataset):  # the "images": a row number is all the stand-in needs
    samples = None
    def __len__(self): return rows
    def __getitem__(self, i): return torch.tensor([float(i)]), i % classes

dataset = Rows()
dataset.samples = [(f"row-{i}", i % classes) for i in range(rows)]
config = load_config(None, ["data.num_workers=0", "data.batch_size=1024", "trainer.progress_bar=false"])
settings = {"format": feature_cache.STORE_FORMAT, "files": dataset.samples, "blocks": [0], "dtype": "float16", "shard_size": config.cache.shard_size}
model = StandInModel()
start = time.perf_counter()
feature_cache.build_store(model, dataset, config, folder, settings)
build_s = time.perf_counter() - start
store = feature_cache.StoredFeatures(folder, model, settings)
head = torch.nn.Linear(2 * width, classes)
optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
loader = DataLoader(store, batch_size=batch, shuffle=True, num_workers=0)
start = time.perf_counter()
seen = 0
for features, labels in loader:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(head(features), labels).backward()
    optimizer.step()
    seen += len(labels)
epoch_s = time.perf_counter() - start
assert seen == rows
size = sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))
print(json.dumps({"rows": rows, "build_s": build_s, "epoch_s": epoch_s, "peak_rss_bytes": vmhwm(), "store_bytes": size}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    from _common import markdown_table, write_result

    results = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    for rows in sorted(args.rows):
        with tempfile.TemporaryDirectory(prefix="dinov3ds_store_") as folder:
            done = subprocess.run([sys.executable, "-c", CHILD, str(rows), str(WIDTH), str(CLASSES), str(BATCH),
                                   str(Path(folder) / "store")], capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["expected_bytes"] = rows * 2 * WIDTH * 2
        result["size_overhead"] = result["store_bytes"] / result["expected_bytes"] - 1
        results.append(result)
        print(f"  {rows} rows: build {result['build_s']:.1f} s, epoch {result['epoch_s']:.1f} s, "
              f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    flat = results[-1]["peak_rss_bytes"] <= 1.5 * results[0]["peak_rss_bytes"]
    sized = all(r["size_overhead"] <= 0.01 for r in results)
    rows = [[f"{r['rows']:,}", round(r["rows"] / r["build_s"]), round(r["rows"] / r["epoch_s"]),
             round(r["peak_rss_bytes"] / 2**20), round(r["store_bytes"] / 2**20, 1), f"{r['size_overhead']:.3%}"]
            for r in results]  # fmt: skip
    print(f"\nfeature store, {2 * WIDTH} float16 values per row, stand-in backbone, probe batch {BATCH}\n")
    print(markdown_table(["rows", "build rows/s", "probe epoch rows/s", "peak RSS MiB", "store MiB",
                          "size over rows x dims x 2"], rows))  # fmt: skip
    print(f"\npeak RSS flat (largest <= 1.5 x smallest): {'PASS' if flat else 'FAIL'}; "
          f"size within 1 %: {'PASS' if sized else 'FAIL'}")
    path = write_result("feature_store", {"dims": 2 * WIDTH, "dtype": "float16", "results": results,
                                          "rss_flat": flat, "size_within_1_percent": sized})  # fmt: skip
    print(f"wrote {path.relative_to(ROOT)}")
    return 0 if flat and sized else 1


if __name__ == "__main__":
    sys.exit(main())
