"""The GPU check: what must hold on a CUDA machine, in one table, in under 5 minutes on one GPU.

1. CUDA eval equals CPU eval: a segmentation checkpoint (random full-depth ViT-S/16, `unet_sum` head trained
   one epoch) evaluated through `dinov3ds eval` on both devices in float32: |mIoU_cuda - mIoU_cpu| <= 1e-3.
2. bf16 features: the CLS and patch features of ViT-S/B/L in bf16 against float32 on the same GPU and images:
   mean cosine >= 0.999.
3. Predict throughput: `classify_files` over the same 64 photos on the GPU and on the CPU (images/s); and
   whether the loader keeps the GPU busy: predict's pipeline (files to scores, `benchmarks/predict.py`'s
   `measure`) in bf16 at 224, batch 32, with the workers predict picks for this machine, against the forward
   alone on the same batches: >= 0.8 of its images/s, classification and segmentation.
4. Backbone throughput: vits16 / vitb16 / vitl16 at 224 and 512, bf16 and float32 (images/s, batch 32).
5. bf16 `vitl16` at 512 as a fraction of the measured bf16 matmul FLOP/s (`benchmarks/flops.py`, target 40 %).
6. The `pmt` head on `vitl16` at 512 in bf16 (150 classes, masked attention annealed away, as after training):
   images/s at batch 1 and 16, printed beside the reference's 128 FPS on an H100 (tue-mps/pmt, compiled).

Run from the repository root on a machine with a GPU: `python benchmarks/gpu_check.py`; the JSON goes to
`benchmarks/results/gpu_check.json` with the card's name. Without a GPU it says so and exits 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import torch  # noqa: E402
from _common import markdown_table, write_result  # noqa: E402
from flops import GPU_TARGET_FRACTION, matmul_peak, measure_row  # noqa: E402
from predict import load, make_photos, measure, train_checkpoint  # noqa: E402

EVAL_TOLERANCE = 1e-3
LOADER_TARGET = 0.8  # predict images/s / forward-only images/s on the GPU, bf16 at 224
COSINE_TARGET = 0.999
VARIANTS = ("vits16", "vitb16", "vitl16")


def eval_on(checkpoint: Path, device: str, out: Path) -> dict:
    from dinov3ds.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--device", device, "--float32",
                     "trainer.progress_bar=false"])  # fmt: skip
    assert code == 0, f"eval on {device} failed"
    return json.loads((out / "eval_metrics.json").read_text())


def segmentation_checkpoint(work: Path) -> Path:
    from dinov3ds.cli import main
    from dinov3ds.data.synthetic import make_segmentation_folder

    root = make_segmentation_folder(work / "seg", num_classes=3, train=8, val=8, size=(128, 160))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "task=segmentation", "backbone.weights=random", "data.dataset=segmentation_folder",
                     f"data.root={root}", "data.num_classes=3", "data.image_size=128", "head.name=unet_sum",
                     "data.num_workers=0", "trainer.max_epochs=1", "trainer.progress_bar=false",
                     "data.batch_size=4", f"output_dir={work / 'seg_run'}"]) == 0  # fmt: skip
    return work / "seg_run" / "checkpoints" / "last.ckpt"


@torch.inference_mode()
def bf16_cosine(name: str) -> dict:
    from dinov3ds.models.backbones import load_backbone

    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        backbone = load_backbone(name, "random", device="cuda", dtype=dtype)
        output = backbone(images)
        outputs[dtype] = torch.cat([output.cls.float(), output.patches.float().flatten(2).transpose(1, 2).flatten(0, 1)])
        del backbone
    cosine = torch.nn.functional.cosine_similarity(outputs[torch.float32], outputs[torch.bfloat16], dim=-1)
    return {"variant": name, "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def predict_rate(checkpoint: Path, photos: list[Path], device: str) -> float:
    from dinov3ds.commands.predict import classify_files
    from dinov3ds.models.tasks import load_model

    model = load_model(checkpoint, device=device, overrides=["inference.batch_size=32", "data.num_workers=4"])
    classify_files(model, photos[:32], 5)  # warm-up
    start = time.perf_counter()
    classify_files(model, photos, 5)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(photos) / (time.perf_counter() - start)


def loader_keeps_up(work: Path, classifier: Path, photos: list[Path], device: str = "cuda") -> list[dict]:
    """`measure` (benchmarks/predict.py) in bf16 at 224, batch 32, data.num_workers = the usable cores, so the
    count is what predict's own rule gives this machine."""
    from dinov3ds.models.hardware import usable_cores

    rows = []
    for task, checkpoint in (("classification", classifier), ("segmentation", train_checkpoint(work, "segmentation"))):
        model = load(checkpoint, "bfloat16", 32, device, usable_cores())
        rows.append(measure(model, task, photos, work / f"loader_{task}", repeats=2, files=False))
        del model
        torch.cuda.empty_cache()
    return rows


PMT_REFERENCE_FPS = 128  # arXiv 2603.25398: PMT-L, frozen DINOv3 ViT-L, ADE20K 512 px, one H100


def pmt_rate(batch: int, device: str = "cuda", repeats: int = 20) -> float:
    """Images/s of backbone + `pmt` head (ViT-L/16, 512 px, bf16 backbone, bf16 autocast for the head)."""
    from dinov3ds.config import config_from_dict
    from dinov3ds.models.tasks import Segmenter, backbone_from_config

    config = config_from_dict({"task": "segmentation", "backbone": {"name": "vitl16", "weights": "random", "dtype": "bfloat16"},
                               "data": {"num_classes": 150, "dataset": "segmentation_folder"}, "head": {"name": "pmt"}})  # fmt: skip
    model = Segmenter(backbone_from_config(config, device), 150, config, [str(i) for i in range(150)]).to(device).eval()
    model.head.mask_probabilities.zero_()  # annealing finished: plain attention, no intermediate predictions
    images = torch.randn(batch, 3, 512, 512, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(images)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check needs one (see the device notes in the README)")
        return 1
    warnings.filterwarnings("ignore")
    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    card = torch.cuda.get_device_name(0)
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("eval cpu vs cuda ...", file=sys.stderr, flush=True)
        checkpoint = segmentation_checkpoint(work)
        cpu, cuda = eval_on(checkpoint, "cpu", work / "cpu"), eval_on(checkpoint, "cuda", work / "cuda")
        difference = abs(cpu["mIoU"] - cuda["mIoU"])
        checks.append(["CUDA eval = CPU eval (float32)", f"mIoU {cuda['mIoU']:.5f} vs {cpu['mIoU']:.5f}",
                       f"<= {EVAL_TOLERANCE}", "PASS" if difference <= EVAL_TOLERANCE else "FAIL"])  # fmt: skip
        print("bf16 cosine ...", file=sys.stderr, flush=True)
        cosines = [bf16_cosine(name) for name in VARIANTS]
        for row in cosines:
            checks.append([f"bf16 vs float32 features, {row['variant']}", f"mean cosine {row['mean_cosine']:.5f}",
                           f">= {COSINE_TARGET}", "PASS" if row["mean_cosine"] >= COSINE_TARGET else "FAIL"])  # fmt: skip
        print("predict ...", file=sys.stderr, flush=True)
        photos = make_photos(work / "photos", 128)
        classifier = train_checkpoint(work, "classification")
        gpu_rate, cpu_rate = predict_rate(classifier, photos, "cuda"), predict_rate(classifier, photos, "cpu")
        checks.append(["predict, classification 224 (img/s)", f"GPU {gpu_rate:.0f} vs CPU {cpu_rate:.1f}",
                       "GPU faster", "PASS" if gpu_rate > cpu_rate else "FAIL"])  # fmt: skip
        print("loader vs forward ...", file=sys.stderr, flush=True)
        loader = loader_keeps_up(work, classifier, make_photos(work / "photos_512", 512, seed=1))
        for row in loader:
            checks.append([f"predict / forward only, {row['task']} bf16 224 batch 32, {row['workers']} workers",
                           f"{row['ratio']:.3f} ({row['predict_images_per_s']:.0f} vs {row['forward_only_images_per_s']:.0f} img/s)",
                           f">= {LOADER_TARGET}", "PASS" if row["ratio"] >= LOADER_TARGET else "FAIL"])  # fmt: skip
    print("backbone throughput ...", file=sys.stderr, flush=True)
    device = torch.device("cuda")
    peaks = {name: matmul_peak(dtype, device) for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    speed = []
    for name in VARIANTS:
        for size in (224, 512):
            for dtype in ("bfloat16", "float32"):
                speed.append(measure_row(name, size, 32, dtype, device, peaks[dtype]))
                torch.cuda.empty_cache()
    target = next(r for r in speed if (r["variant"], r["size"], r["dtype"]) == ("vitl16", 512, "bfloat16"))
    checks.append(["vitl16 512 bf16, fraction of matmul peak", f"{target['fraction_of_peak']:.1%}",
                   f">= {GPU_TARGET_FRACTION:.0%}", "PASS" if target["fraction_of_peak"] >= GPU_TARGET_FRACTION else "FAIL"])  # fmt: skip

    print("pmt throughput ...", file=sys.stderr, flush=True)
    pmt = {batch: pmt_rate(batch) for batch in (1, 16)}
    torch.cuda.empty_cache()

    print(f"## GPU check on {card}\n")
    print(markdown_table(["check", "measured", "target", "verdict"], checks))
    print("\n## Backbone images/s, batch 32\n")
    print(markdown_table(["variant", "size", "dtype", "images/s", "fraction of matmul peak"],
                         [[r["variant"], r["size"], r["dtype"], round(r["images_per_s"], 1),
                           f"{r['fraction_of_peak']:.1%}"] for r in speed]))  # fmt: skip
    print(f"\n## pmt on vitl16, 512 px, bf16: {pmt[1]:.1f} images/s at batch 1, {pmt[16]:.1f} at batch 16 "
          f"(reference: {PMT_REFERENCE_FPS} FPS on an H100, compiled)")
    path = write_result("gpu_check", {"card": card, "checks": checks, "eval": {"cpu": cpu, "cuda": cuda},
                                      "pmt_images_per_s": {"batch_1": pmt[1], "batch_16": pmt[16],
                                                           "reference_fps_h100": PMT_REFERENCE_FPS},
                                      "bf16_cosine": cosines, "predict_images_per_s": {"gpu": gpu_rate, "cpu": cpu_rate},
                                      "loader_vs_forward": loader,
                                      "backbone": speed, "matmul_peak": peaks})  # fmt: skip
    print(f"\nwrote {path}")
    return 0 if all(row[-1] == "PASS" for row in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
