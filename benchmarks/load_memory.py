"""Peak memory of loading ViT-7B-shaped weights as a bfloat16 backbone, for every format the loader reads.

Each file is written tensor by tensor (never a whole float32 model in memory) with seeded values, loaded in
a fresh interpreter with `load_backbone("vit7b16", file, dtype=bfloat16)`, and its peak resident memory
(VmHWM) above the interpreter's idle size is compared with the bfloat16 model's size: the target is
≤ 1.2x (issue "Files, folders and machines from anyone, round 3": before streaming, timm's float32
safetensors file failed with `unable to mmap 26864183368 bytes` on a 24 GB machine).

Formats: `meta_pth` (Meta's keys, torch.save, float32 or, when float32 would not fit in memory to write,
bfloat16), `timm_safetensors` (timm's keys, float32, one file), `transformers_sharded` (transformers' keys,
float32, 2 GB shards with an index), `random` (no file: `weights=random`, drawn in bfloat16 directly).

    python benchmarks/load_memory.py                 # the real 7B shape, depth 40 (~27 GB of disk per format)
    python benchmarks/load_memory.py --depth 4       # the same widths, 4 blocks (what the README's row used)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

LIMIT = 1.2
SHARD_BYTES = 2 << 30
CHILD = r"""
import json, sys, time, torch
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.weights import streaming
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
torch.set_num_threads(2)
# A reduced depth stays under the 7B's parameter count: draw random weights as the full 7B does.
streaming.DRAW_IN_TARGET_DTYPE_ABOVE = 0
baseline = status("VmRSS")
start = time.perf_counter()
backbone = load_backbone("vit7b16", sys.argv[1], dtype=torch.bfloat16, depth=int(sys.argv[2]))
seconds, peak = time.perf_counter() - start, status("VmHWM")
with torch.inference_mode():
    backbone(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))  # the loaded model works
size = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
print(json.dumps({"baseline": baseline, "peak": peak, "model_bytes": size, "load_s": seconds}))
"""


def timm_shapes(depth: int) -> dict:
    """The timm 7B model's tensors (name → shape, dtype), from a model built on the meta device."""
    import torch

    from dinov3ds.models.variants import get_spec
    from dinov3ds.models.weights.streaming import empty_model

    model = empty_model(get_spec("vit7b16"), {"depth": depth})
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if t.dtype == torch.float32}


def meta_names(name: str) -> str:
    for timm_name, meta in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"), ("reg_token", "storage_tokens"),
                            ("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3")):  # fmt: skip
        name = name.replace(timm_name, meta)
    return name


def transformers_names(name: str, shape: tuple) -> list[tuple[str, tuple]]:
    """timm → transformers (DINOv3ViTModel) names; the fused qkv becomes three projections."""
    top = {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias"}  # fmt: skip
    if name in top:
        return [(top[name], shape)]
    block, rest = name.split(".", 2)[1], name.split(".", 2)[2]
    if rest == "attn.qkv.weight":
        return [(f"layer.{block}.attention.{p}_proj.weight", (shape[0] // 3, shape[1])) for p in "qkv"]
    renames = {"attn.proj": "attention.o_proj", "gamma_1": "layer_scale1.lambda1", "gamma_2": "layer_scale2.lambda1",
               "mlp.fc1_g": "mlp.gate_proj", "mlp.fc1_x": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}  # fmt: skip
    for old, new in renames.items():
        rest = rest.replace(old, new)
    return [(f"layer.{block}.{rest}", shape)]


def seeded(shape: tuple, index: int):
    import torch

    generator = torch.Generator().manual_seed(index)
    return torch.randn(shape, generator=generator) * 0.02


def write_safetensors(path: Path, tensors: list[tuple[str, tuple]], start: int = 0) -> dict[str, str]:
    """A float32 safetensors file written one tensor at a time (the format is a JSON header, then raw bytes)."""
    header, offset = {}, 0
    for name, shape in tensors:
        size = 4 * int(math.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for index, (_, shape) in enumerate(tensors):
            handle.write(seeded(shape, start + index).numpy().tobytes())
    return {name: path.name for name, _ in tensors}


def write_file(file_format: str, folder: Path, depth: int) -> Path:
    import torch

    shapes = list(timm_shapes(depth).items())
    if file_format == "timm_safetensors":
        path = folder / "model.safetensors"
        write_safetensors(path, shapes)
        return path
    if file_format == "transformers_sharded":
        path = folder / "hf"
        path.mkdir()
        names = [entry for name, shape in shapes for entry in transformers_names(name, shape)]
        shards, current, size = [], [], 0
        for name, shape in names:
            current.append((name, shape))
            size += 4 * int(math.prod(shape))
            if size >= SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
        shards += [current] if current else []
        weight_map, start = {}, 0
        for number, shard in enumerate(shards, 1):
            weight_map |= write_safetensors(path / f"model-{number:05d}-of-{len(shards):05d}.safetensors", shard, start)
            start += len(shard)
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (path / "config.json").write_text("{}")
        return path
    # Meta's .pth: torch.save needs the whole dict in memory; float32 when that fits, else bfloat16.
    total = 4 * sum(int(math.prod(s)) for _, s in shapes)
    dtype = torch.float32 if total < 0.6 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") else torch.bfloat16
    state = {meta_names(name): seeded(shape, index).to(dtype) for index, (name, shape) in enumerate(shapes)}
    path = folder / "dinov3_vit7b16_benchmark.pth"
    torch.save(state, path)
    return path


def measure(path: Path | str, depth: int, cache: Path) -> dict:
    env = {**os.environ, "DINOV3DS_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(depth)], cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["killed"])[-1][:300], "returncode": result.returncode}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=40, help="blocks (40: the real ViT-7B)")
    parser.add_argument("--formats", nargs="+", default=["meta_pth", "timm_safetensors", "transformers_sharded", "random"])
    parser.add_argument("--folder", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    rows, results = [], {}
    for file_format in args.formats:
        with tempfile.TemporaryDirectory(prefix="dinov3ds_load_memory_", dir=args.folder) as folder:
            started = time.perf_counter()
            path = "random" if file_format == "random" else write_file(file_format, Path(folder), args.depth)
            write_s = time.perf_counter() - started
            on_disk = 0 if path == "random" else sum(f.stat().st_size for f in [Path(path), *Path(path).rglob("*")] if f.is_file())
            measured = measure(path, args.depth, Path(folder) / "cache") | {"file_bytes": on_disk, "write_s": write_s}
        results[file_format] = measured
        if "error" in measured:
            rows.append([file_format, round(on_disk / 2**30, 2), "-", "-", "-", "-", f"FAIL: {measured['error']}"])
            continue
        growth = measured["peak"] - measured["baseline"]
        ratio = growth / measured["model_bytes"]
        measured |= {"growth_bytes": growth, "ratio_to_bf16_model": ratio}
        rows.append([file_format, round(on_disk / 2**30, 2), round(measured["model_bytes"] / 2**30, 2),
                     round(growth / 2**30, 2), round(ratio, 3), round(measured["load_s"], 1),
                     "PASS" if ratio <= LIMIT else "FAIL"])  # fmt: skip
        print(f"  {file_format}: {ratio:.3f}x the bf16 model", flush=True)
    headers = ["format", "file GiB", "bf16 model GiB", "peak − idle GiB", "÷ bf16 model", "load s", f"≤ {LIMIT}x"]
    print(f"\nvit7b16 shape (width 4096), depth {args.depth}, loaded as bfloat16\n")
    print(markdown_table(headers, rows))
    path = write_result(f"load_memory_7b_depth{args.depth}", {"depth": args.depth, "limit": LIMIT, "results": results})
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
