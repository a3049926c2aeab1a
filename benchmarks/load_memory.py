"""Peak memory of loading a full-size ViT-L/16 checkpoint in Meta's format (DESIGN.md §4, "Memory").

The loader builds the model on the meta device and assigns tensors memory-mapped from the file (weights_only, mmap), so a float32 load
should cost about one copy of the file. Each case runs in a fresh interpreter: baseline is its RSS after
`import torch, dinov3ds`, peak is `ru_maxrss` after `load_backbone` and one small forward. Mapped file pages
count towards RSS, so the float32 model's weights show up as RssFile, not RssAnon.

Run from the repository root: `python benchmarks/load_memory.py [--cases float32 bfloat16 naive]` (about
1.2 GB of temporary disk; < 2 min without the naive reference on an idle 2-core machine). The first case
also hashes the file (the SHA-256 cache starts empty), which is included in its load time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

LIMIT = 1.2  # peak - baseline must stay within this multiple of the file size (float32)

# Runs in a fresh interpreter; prints one JSON line. argv: mode, path.
CHILD = r"""
import gc, json, resource, sys, time
import torch
import dinov3ds.models.backbones as backbones

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

torch.set_num_threads(2)
mode, path = sys.argv[1], sys.argv[2]
gc.collect()
baseline = status()["VmRSS"]
start = time.perf_counter()
if mode == "naive":  # what a plain timm user would do: random init, then a full read of the file
    import timm
    from timm.models import eva
    model = timm.create_model("vit_large_patch16_dinov3_qkvb", pretrained=False, num_classes=0).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(eva.checkpoint_filter_fn(state, model))
    del state
    forward = lambda x: model.forward_features(x)
else:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[mode]
    model = backbones.load_backbone("vitl16", path, dtype=dtype)
    forward = model
load_s = time.perf_counter() - start
with torch.inference_mode():
    forward(torch.randn(1, 3, 32, 32))
gc.collect()
end = status()
print(json.dumps({
    "baseline_bytes": baseline,
    "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "final_rss_bytes": end["VmRSS"],
    "final_rss_anon_bytes": end["RssAnon"],
    "final_rss_file_bytes": end["RssFile"],
    "load_s": load_s,
}))
"""

CASES = {
    "float32": "load_backbone(dtype=float32): meta device + mmap + assign",
    "bfloat16": "load_backbone(dtype=bfloat16): mmap fp32 pages, bf16 copies",
    "naive": "reference: timm random init + torch.load without mmap",
}


def write_checkpoint(folder: Path) -> Path:
    """A random full-depth vitl16 in Meta's format, written in a child so this process stays small."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); from pathlib import Path; "
        "from tests.checkpoints import write_official_checkpoint; "
        "print(write_official_checkpoint('vitl16', Path(sys.argv[1]), depth=24))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, env=_env(folder), capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"writing the checkpoint failed:\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def _env(folder: Path) -> dict[str, str]:
    """Keep the hash cache in the temporary folder; make `tests` and `dinov3ds` importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "DINOV3DS_CACHE": str(folder / "cache"), "PYTHONPATH": path}


def measure(mode: str, checkpoint: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(checkpoint)],
        cwd=ROOT,
        env=_env(checkpoint.parent),
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"case {mode} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The naive reference random-initialises 300M parameters (~40 s on 2 cores): opt-in to stay under 3 min.
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["float32", "bfloat16"])
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dinov3ds_load_memory_") as folder:
        write_start = time.perf_counter()
        checkpoint = write_checkpoint(Path(folder))
        write_s = time.perf_counter() - write_start
        file_bytes = checkpoint.stat().st_size
        print(f"wrote {checkpoint.name}: {file_bytes / 2**30:.3f} GiB in {write_s:.1f} s", flush=True)
        results = {}
        for mode in args.cases:
            measured = measure(mode, checkpoint)
            delta = measured["peak_bytes"] - measured["baseline_bytes"]
            measured |= {
                "delta_bytes": delta,
                "ratio_to_file": delta / file_bytes,
                "description": CASES[mode],
            }
            if mode == "float32":
                measured["check"] = f"ratio <= {LIMIT}: " + (
                    "PASS" if delta <= LIMIT * file_bytes else "FAIL"
                )
            results[mode] = measured
            print(f"  {mode}: peak - baseline = {delta / 2**30:.3f} GiB", flush=True)

    gib = 2**30
    rows = [
        [
            mode,
            round(r["baseline_bytes"] / gib, 3),
            round(r["peak_bytes"] / gib, 3),
            round(r["delta_bytes"] / gib, 3),
            round(r["ratio_to_file"], 3),
            round(r["final_rss_anon_bytes"] / gib, 3),
            round(r["final_rss_file_bytes"] / gib, 3),
            round(r["load_s"], 1),
            r.get("check", "info"),
        ]
        for mode, r in results.items()
    ]
    headers = [
        "case", "baseline GiB", "peak GiB", "peak−baseline GiB", "÷ file", "end RssAnon GiB",
        "end RssFile GiB", "load s", "check",
    ]  # fmt: skip
    print(f"\nvitl16 (depth 24, fp32 file {file_bytes / gib:.3f} GiB = {file_bytes:,} bytes)\n")
    print(markdown_table(headers, rows))
    verdict = results.get("float32", {}).get("check", "float32 not run")
    print(f"\nfloat32 {verdict}")
    path = write_result(
        "load_memory",
        {
            "variant": "vitl16",
            "file_name": checkpoint.name,
            "file_bytes": file_bytes,
            "limit_ratio": LIMIT,
            "results": results,
            "total_s": round(time.perf_counter() - started, 1),
        },
    )
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
