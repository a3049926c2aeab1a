"""Peak memory and step time of each `backbone.finetune` mode, as ratios to the frozen backbone.

One training step = backbone forward, a linear head on the patch mean, backward, AdamW step, on a batch of
random images. Each case runs in a fresh interpreter (peak resident memory on a CPU, peak allocated memory
on a GPU), after 2 warm-up steps; the time is the median of the next steps. Random weights of the real
sizes (the numbers do not depend on the values).

    python benchmarks/finetune.py                                   # ViT-S and ViT-B at 224 and 512, on the CPU
    python benchmarks/finetune.py --device cuda --batch 16          # the same on a GPU
    python benchmarks/finetune.py --variants vits16 --sizes 224     # one row set
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

MODES = [("frozen", False), ("lora", False), ("last_blocks", False), ("full", False), ("lora", True), ("full", True)]

CHILD = r"""
import json, statistics, sys, time, torch
from dinov3ds.config import load_config
from dinov3ds.models.finetune import make_trainable
from dinov3ds.models.tasks import backbone_from_config
variant, size, mode, checkpointing, device, batch, steps = sys.argv[1:8]
size, batch, steps, checkpointing = int(size), int(batch), int(steps), checkpointing == "1"
torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
overrides = ["backbone.weights=random", f"backbone.name={variant}", f"backbone.finetune={mode}",
             f"backbone.grad_checkpointing={str(checkpointing).lower()}"]
if mode == "last_blocks":
    overrides.append("backbone.unfreeze_last_blocks=4")
config = load_config(None, overrides)
backbone = backbone_from_config(config, device)
make_trainable(backbone, config.backbone)
backbone.train()
head = torch.nn.Linear(backbone.embed_dim, 10).to(device)
parameters = [p for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad]
optimizer = torch.optim.AdamW(parameters, lr=1e-4)
images = torch.randn(batch, 3, size, size, device=device)
labels = torch.randint(0, 10, (batch,), device=device)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
def step():
    context = torch.no_grad() if mode == "frozen" else torch.enable_grad()
    with context:
        features = backbone(images).patches.mean((-2, -1))
    loss = torch.nn.functional.cross_entropy(head(features), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
baseline = status("VmRSS")
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
times = []
for index in range(2 + steps):
    start = time.perf_counter()
    step()
    if index >= 2:
        times.append(time.perf_counter() - start)
peak = torch.cuda.max_memory_allocated() if device == "cuda" else status("VmHWM") - baseline
trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
print(json.dumps({"step_s": statistics.median(times), "peak_bytes": peak, "backbone_trainable": trainable}))
"""


def run_case(variant: str, size: int, mode: str, checkpointing: bool, device: str, batch: int, steps: int) -> dict:
    arguments = [variant, str(size), mode, "1" if checkpointing else "0", device, str(batch), str(steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", CHILD, *arguments], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["killed"])[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["vits16", "vitb16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows, results = [], []
    for variant in args.variants:
        for size in args.sizes:
            frozen = None
            for mode, checkpointing in MODES:
                measured = run_case(variant, size, mode, checkpointing, args.device, args.batch, args.steps)
                label = mode + (" + grad ckpt" if checkpointing else "")
                results.append({"variant": variant, "size": size, "mode": mode, "grad_checkpointing": checkpointing, **measured})
                if "error" in measured:
                    rows.append([variant, size, label, "-", "-", "-", "-", measured["error"]])
                    continue
                frozen = frozen or measured
                rows.append([variant, size, label, f"{measured['backbone_trainable']:,}",
                             round(measured["peak_bytes"] / 2**20), round(measured["peak_bytes"] / frozen["peak_bytes"], 2),
                             round(measured["step_s"], 3), round(measured["step_s"] / frozen["step_s"], 2)])  # fmt: skip
                print(" | ".join(str(v) for v in rows[-1]), flush=True)
    headers = ["variant", "size", "mode", "backbone trainable", "peak MiB", "× frozen", "step s", "× frozen"]
    print(f"\nbatch {args.batch}, device {args.device}\n")
    print(markdown_table(headers, rows))
    path = write_result(f"finetune_{args.device}", {"batch": args.batch, "steps": args.steps, "results": results})
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
