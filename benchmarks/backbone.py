"""Backbone forward speed: dinov3ds (timm Eva) against HF transformers' DINOv3ViTModel, bf16, torch.compile.

Three sections, all in one process, all timed by alternating the contenders run by run (the order flips every
pair) and reporting medians, so a noisy or shared machine hits both sides alike:

1. Parity: images/s of `load_backbone(name, "random")` forward (`Backbone.__call__`: `forward_features` plus
   the NCHW reshape) next to HF's `DINOv3ViTModel` carrying *the same weights* (timm keys mapped to HF keys
   below). Outputs are compared first (max abs error); acceptance: median of per-pair ratios ours/theirs
   >= 0.97 in every row.
2. bf16: `load_backbone(..., dtype=torch.bfloat16)` against float32, frozen ViT-S/16 at 224, batch 8.
   Speed on full-size random vits16; patch-feature cosine similarity on the shared fixture weights
   (`dinov3_vits16_d2_fixture`, depth 2) and the fixture inputs. Acceptance: >= 1.8x faster, cosine >= 0.999.
3. torch.compile: `torch.compile(backbone)` and the library's own `Backbone.compile_blocks` (what
   `trainer.compile: true` runs) against eager float32 and eager bf16 (same shape), with the compile time and,
   if compiling fails, the reason.

Run from the repository root: `python benchmarks/backbone.py` (quick: vits16 + vitb16 at 224 bs 1/8 and
512 bs 1, < 4 min on 2 CPU cores); `--full` adds vitl16 and 512 bs 8; `--no-compile` skips section 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

import torch  # noqa: E402
from _common import markdown_table, write_result  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "dinov3_reference"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/dinov3_reference")
FIXTURE_WEIGHTS = FIXTURES / "dinov3_vits16_d2_fixture-38c367ae.pth"
FIXTURE_INPUTS = FIXTURES / "dinov3_fixture_inputs.pt"

PARITY_LIMIT = 0.97
BF16_SPEEDUP_LIMIT = 1.8
BF16_COSINE_LIMIT = 0.999


def sig(value: float, digits: int = 3) -> float:
    """Round to `digits` significant digits for the table (the JSON keeps full precision)."""
    return float(f"{value:.{digits}g}")


def hf_from_timm(backbone) -> torch.nn.Module:
    """HF DINOv3ViTModel with the weights of a dinov3ds ViT backbone (timm Eva, `_qkvb` names)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    eva = backbone.model
    block = eva.blocks[0]
    hidden = block.mlp.fc1.out_features
    config = DINOv3ViTConfig(
        hidden_size=backbone.embed_dim,
        num_hidden_layers=len(eva.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=hidden,
        num_register_tokens=backbone.num_registers,
        layer_norm_eps=block.norm1.eps,
        rope_theta=100.0,
        key_bias=False,
        query_bias=True,
        value_bias=True,
        pos_embed_rescale=2.0,
    )
    hf = DINOv3ViTModel(config)
    hf.set_attn_implementation("sdpa")  # the kernel timm's Eva uses (F.scaled_dot_product_attention)
    source = eva.state_dict()
    mapped = {
        "embeddings.cls_token": source["cls_token"],
        "embeddings.register_tokens": source["reg_token"],
        "embeddings.patch_embeddings.weight": source["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": source["patch_embed.proj.bias"],
        "norm.weight": source["norm.weight"],
        "norm.bias": source["norm.bias"],
    }
    for i in range(len(eva.blocks)):
        s, d = f"blocks.{i}.", f"model.layer.{i}."
        q, k, v = source[s + "attn.qkv.weight"].chunk(3, dim=0)
        mapped |= {
            d + "norm1.weight": source[s + "norm1.weight"],
            d + "norm1.bias": source[s + "norm1.bias"],
            d + "attention.q_proj.weight": q,
            d + "attention.q_proj.bias": source[s + "attn.q_bias"],
            d + "attention.k_proj.weight": k,
            d + "attention.v_proj.weight": v,
            d + "attention.v_proj.bias": source[s + "attn.v_bias"],
            d + "attention.o_proj.weight": source[s + "attn.proj.weight"],
            d + "attention.o_proj.bias": source[s + "attn.proj.bias"],
            d + "layer_scale1.lambda1": source[s + "gamma_1"],
            d + "layer_scale2.lambda1": source[s + "gamma_2"],
            d + "norm2.weight": source[s + "norm2.weight"],
            d + "norm2.bias": source[s + "norm2.bias"],
            d + "mlp.up_proj.weight": source[s + "mlp.fc1.weight"],
            d + "mlp.up_proj.bias": source[s + "mlp.fc1.bias"],
            d + "mlp.down_proj.weight": source[s + "mlp.fc2.weight"],
            d + "mlp.down_proj.bias": source[s + "mlp.fc2.bias"],
        }
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"embeddings.mask_token"}, missing  # only used with bool_masked_pos
    return hf.eval().requires_grad_(False).to(backbone.dtype)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(contenders: dict, repeats: int, warmup: int, sync, min_sample_s: float = 0.25) -> dict[str, list[float]]:
    """Seconds per call for each contender, run in turn (order rotated each round) after `warmup` calls each.

    Calls shorter than `min_sample_s` are repeated inside one sample (same count for every contender), so
    a sample is long enough to be above timer and scheduler noise."""
    names = list(contenders)
    slowest = 0.0
    for _ in range(warmup):
        for name in names:
            slowest = max(slowest, timed(contenders[name], sync))
    calls = max(1, round(min_sample_s / max(slowest, 1e-6)))

    def sample(fn):
        for _ in range(calls):
            fn()

    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(lambda fn=contenders[name]: sample(fn), sync) / calls)
    return times


def pair_ratios(mine: list[float], theirs: list[float]) -> list[float]:
    """Per-round throughput ratio mine/theirs = their time / my time."""
    return [t / m for m, t in zip(mine, theirs)]


def parity_section(variants, shapes, repeats, device, sync) -> tuple[list[dict], list[list]]:
    from dinov3ds.models.backbones import load_backbone

    rows, table = [], []
    for name in variants:
        backbone = load_backbone(name, "random", device=device)
        hf = hf_from_timm(backbone).to(device)
        generator = torch.Generator().manual_seed(0)
        for size, batch in shapes:
            images = torch.randn(batch, 3, size, size, generator=generator).to(device)
            with torch.inference_mode():
                ours_tokens = backbone.model.forward_features(images)
                theirs_tokens = hf(pixel_values=images).last_hidden_state
                error = (ours_tokens - theirs_tokens).abs().max().item()
                times = alternate(
                    {
                        "ours": lambda b=backbone, x=images: b(x),
                        "hf": lambda h=hf, x=images: h(pixel_values=x).last_hidden_state,
                    },
                    repeats, warmup=1, sync=sync,
                )  # fmt: skip
            ratios = pair_ratios(times["ours"], times["hf"])
            ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
            ratio = statistics.median(ratios)
            verdict = "PASS" if ratio >= PARITY_LIMIT else "FAIL"
            row = {
                "variant": name, "size": size, "batch": batch, "max_abs_err": error,
                "ours_images_per_s": batch / ours_s, "hf_images_per_s": batch / hf_s,
                "ours_s": times["ours"], "hf_s": times["hf"], "pair_ratios": ratios,
                "median_ratio": ratio, "verdict": verdict,
            }  # fmt: skip
            rows.append(row)
            table.append([name, size, batch, f"{error:.1e}", sig(batch / ours_s), sig(batch / hf_s), sig(ratio), verdict])
            print(f"  {name} {size} bs{batch}: ratio {ratio:.3f} (err {error:.1e})", file=sys.stderr, flush=True)
        del backbone, hf
    return rows, table


def hf_mapping_check() -> dict:
    """The mapping proven on weights where every block matters: random init has layer scales of 1e-5, so
    random-weight outputs barely depend on the blocks; the fixture's gammas are U(0.1, 1)."""
    from dinov3ds.models.backbones import load_backbone

    inputs = torch.load(FIXTURE_INPUTS, map_location="cpu", weights_only=True)
    backbone = load_backbone("vits16", FIXTURE_WEIGHTS, depth=2)
    hf = hf_from_timm(backbone)
    errors = {}
    with torch.inference_mode():
        for key in ("input.b2_224x224", "input.b1_160x240"):
            ours = backbone.model.forward_features(inputs[key])
            theirs = hf(pixel_values=inputs[key]).last_hidden_state
            errors[key] = (ours - theirs).abs().max().item()
    return {"weights": FIXTURE_WEIGHTS.name, "max_abs_err": errors}


def cosine_on_fixture() -> dict:
    from dinov3ds.models.backbones import load_backbone

    inputs = torch.load(FIXTURE_INPUTS, map_location="cpu", weights_only=True)["input.b2_224x224"]
    fp32 = load_backbone("vits16", FIXTURE_WEIGHTS, depth=2)
    bf16 = load_backbone("vits16", FIXTURE_WEIGHTS, depth=2, dtype=torch.bfloat16)
    with torch.inference_mode():
        reference = fp32(inputs).patches.float()
        candidate = bf16(inputs).patches.float()
    per_token = torch.nn.functional.cosine_similarity(reference, candidate, dim=1)  # [B, h, w]
    flat = torch.nn.functional.cosine_similarity(reference.flatten(), candidate.flatten(), dim=0)
    return {
        "weights": FIXTURE_WEIGHTS.name,
        "input": "input.b2_224x224",
        "patch_cosine_min": per_token.min().item(),
        "patch_cosine_mean": per_token.mean().item(),
        "patch_cosine_flat": flat.item(),
        "max_abs_err": (reference - candidate).abs().max().item(),
    }


def dtype_and_compile_section(repeats, device, sync, compile_model: bool) -> dict:
    from dinov3ds.models.backbones import load_backbone

    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    fp32 = load_backbone("vits16", "random", device=device)
    bf16 = load_backbone("vits16", "random", device=device, dtype=torch.bfloat16)
    contenders = {"float32": lambda: fp32(images), "bfloat16": lambda: bf16(images)}
    result: dict = {"shape": "vits16 (full depth, random weights), 224x224, batch 8", "compile": None}
    if compile_model:
        info: dict = {"attempted": True}
        try:
            compiled = torch.compile(fp32)
            with torch.inference_mode():
                start = time.perf_counter()
                compiled(images)
                sync()
                info["first_call_s"] = time.perf_counter() - start
                out_c, out_e = compiled(images).patches, fp32(images).patches
                info["max_abs_err_vs_eager"] = (out_c - out_e).abs().max().item()
            contenders["float32+compile"] = lambda: compiled(images)
            info["ok"] = True
        except Exception as error:  # noqa: BLE001 - the reason is the result
            info |= {"ok": False, "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        result["compile"] = info
        if hasattr(fp32, "compile_blocks"):  # the library's own path (trainer.compile: true)
            blocks = {"attempted": True}
            per_block = load_backbone("vits16", "random", device=device)
            start = time.perf_counter()
            blocks["ok"] = per_block.compile_blocks(images[:1])
            blocks["first_call_s"] = time.perf_counter() - start
            if blocks["ok"]:
                with torch.inference_mode():
                    per_block(images)  # dynamic=True: the batch-8 shape compiles without a recompile storm
                    out = per_block(images).patches
                    blocks["max_abs_err_vs_eager"] = (out - fp32(images).patches).abs().max().item()
                contenders["float32+compile_blocks"] = lambda: per_block(images)
            result["compile_blocks"] = blocks
    with torch.inference_mode():
        times = alternate(contenders, repeats, warmup=1, sync=sync)
    result["seconds"] = times
    result["images_per_s"] = {name: 8 / statistics.median(t) for name, t in times.items()}
    result["bf16_speedup"] = statistics.median(pair_ratios(times["bfloat16"], times["float32"]))
    if "float32+compile" in times:
        result["compile"]["speedup_vs_float32"] = statistics.median(
            pair_ratios(times["float32+compile"], times["float32"])
        )
        result["compile"]["speedup_vs_bfloat16"] = statistics.median(
            pair_ratios(times["float32+compile"], times["bfloat16"])
        )
    if "float32+compile_blocks" in times:
        result["compile_blocks"]["speedup_vs_float32"] = statistics.median(
            pair_ratios(times["float32+compile_blocks"], times["float32"])
        )
        result["compile_blocks"]["speedup_vs_bfloat16"] = statistics.median(
            pair_ratios(times["float32+compile_blocks"], times["bfloat16"])
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default sizes (kept for run_all)")
    parser.add_argument("--full", action="store_true", help="add vitl16 and 512 at batch 8")
    parser.add_argument("--variants", nargs="+", help="override the variant list")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per row (after 1 warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="backbone", help="results/<name>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="RANDOM WEIGHTS")
    import logging

    logging.getLogger("dinov3ds").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="backbone dtype")  # the emulated-bf16 warning: the verdict says it
    from dinov3ds.models.hardware import CPU_NATIVE_FLAGS, native_support

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = args.variants or (["vits16", "vitb16", "vitl16"] if args.full else ["vits16", "vitb16"])
    shapes = [(224, 1), (224, 8), (512, 1)] + ([(512, 8)] if args.full else [])

    print("HF mapping check on fixture weights ...", file=sys.stderr, flush=True)
    mapping = hf_mapping_check()
    print("parity (ours vs HF DINOv3ViTModel, same weights) ...", file=sys.stderr, flush=True)
    parity_rows, parity_table = parity_section(variants, shapes, args.repeats, device, sync)
    settings = {"variants": variants, "shapes": shapes, "repeats": args.repeats, "threads": torch.get_num_threads()}
    parity_ok = all(row["verdict"] == "PASS" for row in parity_rows)
    parity = {"limit": PARITY_LIMIT, "pass": parity_ok, "mapping_check": mapping, "rows": parity_rows}
    write_result(args.name, {"device": str(device), "settings": settings, "parity": parity, "incomplete": True})
    print("bf16 cosine on fixture ...", file=sys.stderr, flush=True)
    cosine = cosine_on_fixture()
    print("bf16 / compile speed ...", file=sys.stderr, flush=True)
    speed = dtype_and_compile_section(args.repeats, device, sync, compile_model=not args.no_compile)

    bf16_ok = speed["bf16_speedup"] >= BF16_SPEEDUP_LIMIT and cosine["patch_cosine_min"] >= BF16_COSINE_LIMIT
    native_bf16 = native_support(torch.bfloat16, device)
    bf16_verdict = "PASS" if bf16_ok else "FAIL"
    if not bf16_ok and native_bf16 is False:
        bf16_verdict += " (this CPU has no native bf16: none of " + ", ".join(sorted(CPU_NATIVE_FLAGS[torch.bfloat16]))
        bf16_verdict += " in /proc/cpuinfo, so bf16 matmuls are emulated)"
    print(f"## Backbone forward: dinov3ds vs HF DINOv3ViTModel (same weights, {device.type}, "
          f"median of {args.repeats} alternating rounds)\n")  # fmt: skip
    fixture_err = max(mapping["max_abs_err"].values())
    print(f"Weight mapping timm -> HF checked on {mapping['weights']} (depth 2, both fixture inputs): "
          f"max abs err {fixture_err:.1e}. 'max abs err' below: random weights (layer scale 1e-5).\n")
    print(markdown_table(
        ["variant", "size", "batch", "max abs err", "ours img/s", "HF img/s", "ours/HF", f">= {PARITY_LIMIT}"],
        parity_table,
    ))  # fmt: skip
    print("\n## bf16 vs float32 (frozen vits16, 224, batch 8)\n")
    ips = speed["images_per_s"]
    dtype_rows = [[name, sig(value)] for name, value in ips.items()]
    print(markdown_table(["path", "img/s"], dtype_rows))
    print(
        f"\nbf16 speed-up {speed['bf16_speedup']:.2f}x (limit {BF16_SPEEDUP_LIMIT}x); patch cosine on "
        f"{cosine['weights']}: min {cosine['patch_cosine_min']:.5f}, mean {cosine['patch_cosine_mean']:.5f} "
        f"(limit {BF16_COSINE_LIMIT}) -> {bf16_verdict}"
    )
    compile_info = speed["compile"]
    if compile_info is None:
        print("torch.compile: skipped (--no-compile)")
    elif compile_info["ok"]:
        print(
            f"torch.compile: first call {compile_info['first_call_s']:.1f} s, max abs err vs eager "
            f"{compile_info['max_abs_err_vs_eager']:.1e}; speed-up {compile_info['speedup_vs_float32']:.2f}x vs "
            f"eager float32, {compile_info['speedup_vs_bfloat16']:.2f}x vs eager bf16"
        )
    else:
        print(f"torch.compile: failed: {compile_info['reason']}")
    blocks_info = speed.get("compile_blocks")
    if blocks_info and blocks_info.get("speedup_vs_float32"):
        print(
            f"Backbone.compile_blocks (trainer.compile: true): set-up + first call {blocks_info['first_call_s']:.1f} s, "
            f"max abs err vs eager {blocks_info['max_abs_err_vs_eager']:.1e}; speed-up "
            f"{blocks_info['speedup_vs_float32']:.2f}x vs eager float32, {blocks_info['speedup_vs_bfloat16']:.2f}x vs "
            "eager bf16"
        )
    elif blocks_info:
        print("Backbone.compile_blocks: compiling failed, the backbone runs eagerly (see the dinov3ds log)")
    path = write_result(args.name, {
        "device": str(device),
        "settings": settings,
        "parity": parity,
        "bf16": {"speedup_limit": BF16_SPEEDUP_LIMIT, "cosine_limit": BF16_COSINE_LIMIT, "pass": bf16_ok,
                 "verdict": bf16_verdict, "native_bf16": native_bf16, "cosine": cosine, "speed": speed},
    })  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
