"""What each `dinov3ds` subcommand does with its parsed arguments; `cli.py` parses and dispatches.

Each handler imports its command's module when it runs, so `dinov3ds --help` and a config typo answer
before torch and Lightning load.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from dinov3ds.errors import UserError


def run_train(args: argparse.Namespace) -> None:
    from dinov3ds.config import load_config

    if args.config is None and not args.overrides:
        raise UserError("train needs --config FILE or a bundled config's name (dinov3ds configs lists them), or "
                        "key=value overrides on the defaults")
    config = load_config(args.config, args.overrides)  # a config typo fails before torch/Lightning load

    from dinov3ds.training.trainer import train

    result = train(config, resume=args.resume_from or args.resume, overwrite=args.overwrite)
    if not result.is_global_zero:
        return
    best = result.best
    if result.best_checkpoint is not None and best.get("metrics"):
        scores = "  ".join(f"{k}={v:.4f}" for k, v in sorted(best["metrics"].items()))
        print(f"best checkpoint: {result.best_checkpoint} (epoch {best['epoch']}, step {best['step']}): {scores}")
        if "probe" in best:
            probe = best["probe"]
            print(f"probe grid winner: pooling {probe['pooling']}, last {probe['last_blocks']} block(s), lr {probe['lr']:g}")
    else:
        print(f"best checkpoint: {result.best_checkpoint}")
    scores = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if k.startswith("val/"))
    print(f"last checkpoint: {result.last_checkpoint}: {scores}")


def run_eval(args: argparse.Namespace) -> None:
    from dinov3ds.commands.evaluate import evaluate

    evaluate(args.checkpoint, [*args.overrides, *float32_override(args)], output_dir=args.out,
             overwrite=args.overwrite, device=args.device)  # fmt: skip


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value, as every command takes it


def split_overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words → (paths, `section.key=value` overrides). A word that names an existing file is a
    path even if it looks like an override, so no file is ever mistaken for a setting."""
    paths, overrides = [], []
    for value in values:
        (overrides if OVERRIDE.match(value) and not Path(value).exists() else paths).append(value)
    return paths, overrides


def run_predict(args: argparse.Namespace) -> None:
    from dinov3ds.commands.predict import predict

    paths, overrides = split_overrides(args.paths)
    if args.set:
        logging.getLogger("dinov3ds").warning(
            "predict --set is deprecated: write overrides as key=value after the inputs, as for train and eval"
        )
    if not paths:
        raise UserError("predict needs at least one image, folder or .nii/.nii.gz volume after the overrides")
    overrides = [*args.set, *overrides, *(["inference.flip=true"] if args.flip else []), *float32_override(args)]
    check_process_count(args)
    predict(args.checkpoint, paths, args.out, topk=args.topk, mode=args.mode, labels=args.labels, overrides=overrides,
            probabilities=args.probabilities, overwrite=args.overwrite, label_offset=args.label_offset,
            device=args.device, devices=args.devices, resume=args.resume)  # fmt: skip


def run_download(args: argparse.Namespace) -> None:
    from dinov3ds.data.download import download_dataset

    folder = download_dataset(args.name, Path(args.root), url=args.url)
    print(f"{args.name} ready in {folder}")


def run_backbones(args: argparse.Namespace) -> None:
    from dinov3ds.models.variants import VARIANTS
    from dinov3ds.models.weights import sources_found

    print(f"{'name':<18}{'family':<9}{'dim':>6}{'depth':>6}  {'taps':<16}{'data':<10}weights found here")
    for spec in VARIANTS.values():
        taps = ",".join(map(str, spec.default_layers))
        found = " ".join(sources_found(spec)) or "-"
        print(f"{spec.name:<18}{spec.family:<9}{spec.embed_dim:>6}{spec.depth:>6}  {taps:<16}{spec.dataset:<10}{found}")
    print("meta: Meta's .pth in checkpoints/; timm / transformers: that repo in the Hugging Face cache. "
          "backbone.weights also takes a file, a folder or hf-hub:<repo>.")


def run_demo(args: argparse.Namespace) -> None:
    from dinov3ds.commands.demo import run_demo

    run_demo(Path(args.out), backbone=args.backbone, quick=args.quick)


def run_prepare_volumes(args: argparse.Namespace) -> None:
    from dinov3ds.data.medical import prepare_volumes, read_split_csv

    splits = None
    if args.splits:
        splits = read_split_csv(Path(args.splits))
    elif args.val or args.test:
        splits = {"val": [n for n in (args.val or "").split(",") if n], "test": [n for n in (args.test or "").split(",") if n]}
    summary = prepare_volumes(
        Path(args.images), Path(args.labels), Path(args.out), axis=args.axis, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, skip_empty=args.skip_empty, seed=args.seed, splits=splits,
    )  # fmt: skip
    counts = {split: len(names) for split, names in summary["splits"].items()}
    print(f"wrote {args.out}: volumes per split {counts}, slices {summary['slices']}")


def run_export(args: argparse.Namespace) -> None:
    from dinov3ds.commands.export import export

    if args.dynamic_batch:
        logging.getLogger("dinov3ds").warning("export --dynamic-batch is no longer needed: the batch size is always dynamic")
    export(args.checkpoint, args.out, args.format, args.height, args.width, half=args.half, overwrite=args.overwrite,
           device=args.device)  # fmt: skip


def float32_override(args: argparse.Namespace) -> list[str]:
    """`--float32` as the config override it stands for."""
    return ["backbone.dtype=float32"] if args.float32 else []


def backbone_from_args(args: argparse.Namespace):
    """The backbone named by --backbone/--weights, or the one a --checkpoint trained, in --dtype on --device
    (auto: bf16 where the GPU or CPU computes it natively)."""
    if args.checkpoint is not None:
        from dinov3ds.models.tasks import load_model

        dtype = str(backbone_dtype_from_args(args)).removeprefix("torch.")
        return load_model(args.checkpoint, device=args.device, overrides=[f"backbone.dtype={dtype}"]).backbone
    from dinov3ds.models.backbones import load_backbone

    return load_backbone(args.backbone, args.weights, dtype=backbone_dtype_from_args(args), device=args.device)


def backbone_dtype_from_args(args: argparse.Namespace):
    """--dtype as a torch dtype; auto: bfloat16 on a GPU or CPU that computes it natively, else float32."""
    from dinov3ds.models.hardware import auto_inference_dtype, resolve_device
    from dinov3ds.models.tasks import TORCH_DTYPES

    if args.dtype != "auto":
        return TORCH_DTYPES[args.dtype]
    return auto_inference_dtype(resolve_device(args.device))


def check_process_count(args: argparse.Namespace) -> None:
    """--devices against what this machine has (its GPUs, or the cores a CPU run may use), before anything starts:
    64 CPU processes on 2 cores would each hold a model copy and exhaust memory instead of finishing."""
    from dinov3ds.models.hardware import check_devices, resolve_device

    check_devices("cpu" if resolve_device(args.device).type == "cpu" else "gpu", args.devices, key="--devices")


def run_features(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.suffix == ".npz":
        if args.devices != 1:
            raise UserError("--devices needs sharded output: give --out a folder instead of a .npz file")
        from dinov3ds.commands.features import extract_to_npz

        arrays = extract_to_npz(backbone_from_args(args), args.paths, out, image_size=args.image_size,
                                batch_size=args.batch_size, num_workers=args.workers, patches=not args.no_patches,
                                overwrite=args.overwrite)  # fmt: skip
        shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
        print(f"wrote {args.out}: {shapes}")
        return
    from dinov3ds.commands.sharded_features import extract_shards, job_from_arguments

    check_process_count(args)
    if args.checkpoint is not None:
        raise UserError("--checkpoint works with a .npz --out; sharded features take --backbone/--weights")
    job = job_from_arguments(args.paths, out, backbone=args.backbone, weights=args.weights,
                             dtype=backbone_dtype_from_args(args), device=args.device, image_size=args.image_size,
                             batch_size=args.batch_size, workers=args.workers, patches=not args.no_patches,
                             shard_size=args.shard_size)  # fmt: skip
    index = extract_shards(job, devices=args.devices, overwrite=args.overwrite)
    if index:
        print(f"wrote {out}: {index['rows']} images in {len(index['shards'])} shards (read with "
              "dinov3ds.data.feature_shards.read_features)")


def run_pca(args: argparse.Namespace) -> None:
    from dinov3ds.commands.features import pca_pictures
    from dinov3ds.data.io import IMAGE_EXTENSIONS

    out = Path(args.out)
    if out.suffix.lower() in IMAGE_EXTENSIONS and not out.is_dir():  # a picture's name would become a folder
        raise UserError(f"--out {out}: pca writes one <name>_pca.png per image into a folder; give a folder, "
                        f"e.g. --out {out.with_suffix('')}")  # fmt: skip
    for path in pca_pictures(backbone_from_args(args), args.paths, out, image_size=args.image_size):
        print(f"wrote {path}")


def run_knn(args: argparse.Namespace) -> None:
    from dinov3ds.commands.features import knn_evaluate

    backbone = backbone_from_args(args) if args.checkpoint is not None else None
    result = knn_evaluate(args.backbone, args.root, weights=args.weights, image_size=args.image_size, k=args.k,
                          temperature=args.temperature, pooling=args.pooling, dtype=args.dtype,
                          device=args.device, backbone=backbone)  # fmt: skip
    clipped = f" (asked {args.k}; only {result['k']} training images)" if result["k"] < args.k else ""
    print(f"k-NN (k={result['k']}{clipped}, T={args.temperature}): top-1 {100 * result['top1']:.2f}  "
          f"top-5 {100 * result['top5']:.2f}")


def run_check_data(args: argparse.Namespace) -> None:
    from dinov3ds.commands.check_data import check_dataset
    from dinov3ds.commands.output_files import printable
    from dinov3ds.config import load_config

    report = check_dataset(load_config(args.config, args.overrides), workers=args.workers)
    for line in report.problems:
        print(printable(line))
    print(printable(report.summary()))
    if not report.ok:
        raise UserError(f"{len(report.problems)} problems in {report.root} (listed above); fix or remove those files")


def run_report(args: argparse.Namespace) -> None:
    from dinov3ds.report import compare_runs, write_report

    if len(args.runs) == 1:
        out = Path(args.out) if args.out else None
        if out is not None and (out.suffix.lower() not in (".html", ".htm") or (out.exists() and not args.overwrite)):
            raise UserError(f"--out {out}: name a new .html file (or pass --overwrite to replace it)")
        print(f"wrote {write_report(args.runs[0], out=out)}")
        return
    if not args.out:
        raise UserError(f"comparing {len(args.runs)} runs writes one page: name it with --out, e.g. --out comparison.html")
    print(f"wrote {compare_runs(args.runs, args.out, overwrite=args.overwrite)}")


def run_configs(args: argparse.Namespace) -> None:
    from dinov3ds.config.bundled import bundled_configs, copy_config, describe

    if args.action == "copy":
        if not args.name:
            raise UserError("configs copy needs a NAME (dinov3ds configs lists them)")
        print(f"wrote {copy_config(args.name, args.destination)}")
        return
    if args.name:
        raise UserError(f"configs {args.name}: to copy one, write dinov3ds configs copy {args.name} [DEST]")
    found = bundled_configs()
    width = max(map(len, found), default=0)
    for name, path in found.items():
        print(f"{name:<{width}}  {describe(path)}")
    print("use one with --config NAME; copy one to edit with: dinov3ds configs copy NAME [DEST]")
