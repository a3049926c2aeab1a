"""The `dinov3ds` command: parses arguments and dispatches; the work lives in the library modules.

A `UserError` (bad file, bad config, missing weights) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from pathlib import Path

from dinov3ds.errors import DataWarning, UserError


def _train(args: argparse.Namespace) -> None:
    from dinov3ds.config import load_config

    if args.config is None and not args.overrides:
        raise UserError("train needs --config FILE (see configs/), or key=value overrides on the defaults")
    config = load_config(args.config, args.overrides)  # a config typo fails before torch/Lightning load

    from dinov3ds.training.trainer import train

    result = train(config, resume=args.resume_from or args.resume, overwrite=args.overwrite)
    if not result.is_global_zero:
        return
    best = result.best
    if result.best_checkpoint is not None and best.get("metrics"):
        scores = "  ".join(f"{k}={v:.4f}" for k, v in sorted(best["metrics"].items()))
        print(f"best checkpoint: {result.best_checkpoint} (epoch {best['epoch']}, step {best['step']}): {scores}")
    else:
        print(f"best checkpoint: {result.best_checkpoint}")
    scores = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if k.startswith("val/"))
    print(f"last checkpoint: {result.last_checkpoint}: {scores}")


def _eval(args: argparse.Namespace) -> None:
    from dinov3ds.commands.evaluate import evaluate

    evaluate(args.checkpoint, args.overrides, output_dir=args.out, overwrite=args.overwrite)


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value, as every command takes it


def split_overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words → (paths, `section.key=value` overrides). A word that names an existing file is a
    path even if it looks like an override, so no file is ever mistaken for a setting."""
    paths, overrides = [], []
    for value in values:
        (overrides if OVERRIDE.match(value) and not Path(value).exists() else paths).append(value)
    return paths, overrides


def _predict(args: argparse.Namespace) -> None:
    from dinov3ds.commands.predict import predict

    paths, overrides = split_overrides(args.paths)
    if args.set:
        logging.getLogger("dinov3ds").warning(
            "predict --set is deprecated: write overrides as key=value after the inputs, as for train and eval"
        )
    if not paths:
        raise UserError("predict needs at least one image, folder or .nii/.nii.gz volume after the overrides")
    overrides = [*args.set, *overrides, *(["inference.flip=true"] if args.flip else [])]
    predict(args.checkpoint, paths, args.out, topk=args.topk, mode=args.mode, labels=args.labels, overrides=overrides,
            probabilities=args.probabilities, overwrite=args.overwrite, label_offset=args.label_offset)  # fmt: skip


def _download(args: argparse.Namespace) -> None:
    from dinov3ds.data.download import download_dataset

    folder = download_dataset(args.name, Path(args.root), url=args.url)
    print(f"{args.name} ready in {folder}")


def _backbones(args: argparse.Namespace) -> None:
    from dinov3ds.models.loading import sources_found
    from dinov3ds.models.variants import VARIANTS

    print(f"{'name':<18}{'family':<9}{'dim':>6}{'depth':>6}  {'taps':<16}{'data':<10}weights found here")
    for spec in VARIANTS.values():
        taps = ",".join(map(str, spec.default_layers))
        found = " ".join(sources_found(spec)) or "-"
        print(f"{spec.name:<18}{spec.family:<9}{spec.embed_dim:>6}{spec.depth:>6}  {taps:<16}{spec.dataset:<10}{found}")
    print("meta: Meta's .pth in checkpoints/; timm / transformers: that repo in the Hugging Face cache. "
          "backbone.weights also takes a file, a folder or hf-hub:<repo>.")


def _demo(args: argparse.Namespace) -> None:
    from dinov3ds.commands.demo import run_demo

    run_demo(Path(args.out), backbone=args.backbone, quick=args.quick)


def _prepare_volumes(args: argparse.Namespace) -> None:
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


def _export(args: argparse.Namespace) -> None:
    from dinov3ds.commands.export import export

    export(args.checkpoint, args.out, args.format, args.height, args.width, args.dynamic_batch, args.overwrite)


def _backbone_from_args(args: argparse.Namespace):
    from dinov3ds.models.backbones import load_backbone
    from dinov3ds.models.tasks import TORCH_DTYPES

    return load_backbone(args.backbone, args.weights, dtype=TORCH_DTYPES[args.dtype])


def _features(args: argparse.Namespace) -> None:
    from dinov3ds.commands.features import extract_to_npz

    arrays = extract_to_npz(_backbone_from_args(args), args.paths, Path(args.out), image_size=args.image_size,
                            batch_size=args.batch_size, patches=not args.no_patches, overwrite=args.overwrite)  # fmt: skip
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"wrote {args.out}: {shapes}")


def _pca(args: argparse.Namespace) -> None:
    from dinov3ds.commands.features import pca_pictures

    for path in pca_pictures(_backbone_from_args(args), args.paths, Path(args.out), image_size=args.image_size):
        print(f"wrote {path}")


def _knn(args: argparse.Namespace) -> None:
    from dinov3ds.commands.features import knn_evaluate

    result = knn_evaluate(args.backbone, args.root, weights=args.weights, image_size=args.image_size, k=args.k,
                          temperature=args.temperature, pooling=args.pooling, dtype=args.dtype)  # fmt: skip
    clipped = f" (asked {args.k}; only {result['k']} training images)" if result["k"] < args.k else ""
    print(f"k-NN (k={result['k']}{clipped}, T={args.temperature}): top-1 {100 * result['top1']:.2f}  "
          f"top-5 {100 * result['top5']:.2f}")


def _check_data(args: argparse.Namespace) -> None:
    from dinov3ds.commands.check_data import check_dataset
    from dinov3ds.commands.output_files import printable
    from dinov3ds.config import load_config

    report = check_dataset(load_config(args.config, args.overrides), workers=args.workers)
    for line in report.problems:
        print(printable(line))
    print(printable(report.summary()))
    if not report.ok:
        raise UserError(f"{len(report.problems)} problems in {report.root} (listed above); fix or remove those files")


def _add_backbone_arguments(parser: argparse.ArgumentParser, image_size: int) -> None:
    parser.add_argument("--backbone", default="vits16", help="variant name (see `dinov3ds backbones`)")
    parser.add_argument("--weights", default=None,
                        help="Meta .pth, timm/transformers .safetensors or folder, hf-hub:<repo>, or 'random' "
                             "(default: checkpoints/, then the Hugging Face cache)")
    parser.add_argument("--image-size", type=int, default=image_size,
                        help="shorter side in pixels (rounded to a multiple of the patch size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="backbone weight/compute dtype (bfloat16: half the memory; faster where native)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov3ds", description="DINOv3 classifiers and segmenters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a head (config + key=value overrides)")
    train.add_argument("--config", required=False, help="YAML config, e.g. configs/classification_imagenette.yaml")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from checkpoints/last.ckpt")
    train.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                       help="continue the run in output_dir from this checkpoint (e.g. a readable best.ckpt)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in output_dir (its checkpoints, metrics and pictures)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_epochs=5")
    train.set_defaults(handler=_train, trailing="overrides")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its configured validation split")
    evaluate.add_argument("--checkpoint", required=True, help="a dinov3ds head checkpoint (best.ckpt or last.ckpt)")
    evaluate.add_argument("--out", default=None,
                          help="folder for the metrics (default: beside the checkpoint, e.g. checkpoints/best_eval/)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace metric files already in that folder")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=... inference.mode=slide")
    evaluate.set_defaults(handler=_eval, trailing="overrides")

    predict = commands.add_parser("predict", help="run a checkpoint on images, folders or NIfTI volumes")
    predict.add_argument("--checkpoint", required=True, help="a dinov3ds head checkpoint (best.ckpt or last.ckpt)")
    predict.add_argument("paths", nargs="+", metavar="input",
                         help="images, folders, .nii/.nii.gz volumes, and dotted overrides, e.g. inference.flip=true")
    predict.add_argument("--out", default="predictions",
                         help="output folder; it mirrors the inputs' folders and keeps their full names")
    predict.add_argument("--overwrite", action="store_true", help="replace output files left by an earlier run")
    predict.add_argument("--topk", type=int, default=5, help="classification: labels per image")
    predict.add_argument("--mode", choices=["whole", "slide"], default=None, help="segmentation strategy")
    predict.add_argument("--flip", action="store_true", help="segmentation: average with the mirrored image (TTA)")
    predict.add_argument("--label-offset", type=int, default=None,
                         help="segmentation: added to class ids in label PNGs (default: 1 for ADE20K-style data "
                              "trained with reduce_zero_label, so 0 stays 'other'; else 0)")
    predict.add_argument("--labels", default=None, help="NIfTI: label volume (or folder) to report Dice against")
    predict.add_argument("--probabilities", action="store_true", help="NIfTI: also write a probability volume")
    predict.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: key=value
    predict.set_defaults(handler=_predict, trailing="paths")

    download = commands.add_parser("download", help="download and extract a dataset")
    download.add_argument("name", help="imagenette2, imagenette2-320, imagenette2-160 or ade20k")
    download.add_argument("--root", default="data", help="folder to download into")
    download.add_argument("--url", default=None, help="mirror URL of the same archive")
    download.set_defaults(handler=_download)

    backbones = commands.add_parser("backbones", help="list DINOv3 variants and which of their weights are on this machine")
    backbones.set_defaults(handler=_backbones)

    demo = commands.add_parser("demo", help="end-to-end demo on generated data")
    demo.add_argument("--out", default="output/demo", help="folder for the generated data and the runs")
    demo.add_argument("--backbone", default="vits16", help="variant; its Meta weights are used when in checkpoints/")
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    demo.set_defaults(handler=_demo)

    prepare = commands.add_parser("prepare-volumes", help="NIfTI image/label volumes -> 2D slice dataset")
    prepare.add_argument("--images", required=True, help="folder of image volumes (.nii/.nii.gz)")
    prepare.add_argument("--labels", required=True, help="folder of label volumes (name, name_seg, _label or _mask)")
    prepare.add_argument("--out", required=True, help="new folder for the slice dataset (images/, annotations/)")
    prepare.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="volume axis to slice along")
    prepare.add_argument("--val-fraction", type=float, default=0.2, help="share of volumes for val (seeded split)")
    prepare.add_argument("--test-fraction", type=float, default=0.0, help="share of volumes for test (seeded split)")
    prepare.add_argument("--val", default=None, help="comma-separated volume names for val (instead of fractions)")
    prepare.add_argument("--test", default=None, help="comma-separated volume names for test")
    prepare.add_argument("--splits", default=None, help="CSV of name,split rows (train/val/test) instead of fractions")
    prepare.add_argument("--skip-empty", action="store_true", help="drop slices whose label is all background")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the split by fractions")
    prepare.set_defaults(handler=_prepare_volumes)

    export = commands.add_parser("export", help="export backbone + head as ONNX or TorchScript, checked against PyTorch")
    export.add_argument("--checkpoint", required=True, help="a dinov3ds head checkpoint")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="graph format")
    export.add_argument("--out", required=True, help="the graph file; <out>.json beside it holds the preprocessing")
    export.add_argument("--height", type=int, default=None, help="input height (default: data.image_size)")
    export.add_argument("--width", type=int, default=None, help="input width (default: data.image_size)")
    export.add_argument("--dynamic-batch", action="store_true", help="ONNX: batch size chosen at run time")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.set_defaults(handler=_export)

    features = commands.add_parser("features", help="dump CLS / pooled / patch features of images to .npz")
    features.add_argument("paths", nargs="+", help="images or folders")
    features.add_argument("--out", required=True, help="output .npz")
    features.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    features.add_argument("--no-patches", action="store_true", help="skip the [N,C,h,w] patch features")
    features.add_argument("--overwrite", action="store_true", help="replace an existing .npz")
    _add_backbone_arguments(features, 224)
    features.set_defaults(handler=_features)

    pca = commands.add_parser("pca", help="PCA-of-patch-features picture per image")
    pca.add_argument("paths", nargs="+", help="images or folders")
    pca.add_argument("--out", default="output/pca", help="folder for the <name>_pca.png pictures")
    _add_backbone_arguments(pca, 448)
    pca.set_defaults(handler=_pca)

    knn = commands.add_parser("knn", help="k-NN classification (DINO's weighted votes) on an image-folder dataset")
    knn.add_argument("--root", required=True, help="folder with train/<class>/ and val/<class>/")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (at most the training images)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T); T > 0")
    knn.add_argument("--pooling", choices=["cls", "avg", "cls+avg"], default="cls+avg", help="which features vote")
    _add_backbone_arguments(knn, 224)
    knn.set_defaults(handler=_knn)

    check = commands.add_parser("check-data", help="decode every image and mask of a config's dataset; list all problems")
    check.add_argument("--config", required=False, help="the YAML config training would use")
    check.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count, at most 8)")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=...")
    check.set_defaults(handler=_check_data, trailing="overrides")
    return parser


def _quiet_libraries() -> None:
    """Lightning and PyTorch chatter buries the lines a user needs; -v brings it back."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("always", category=DataWarning)  # files skipped on purpose are always reported
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _one_line(error: UserError) -> str:
    """The user's message, on one line. A UserError raised in a DataLoader worker comes back re-created around the
    worker's whole traceback ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): keep
    only its last line, which is the original message."""
    message = str(error)
    if "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
        message = lines[-1].removeprefix(prefix) if lines else message
    return " ".join(message.splitlines())


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """argparse takes a positional list only in one place; words after the options (`eval --checkpoint c
    --out o key=value`) join the command's list of inputs or overrides instead of being refused."""
    parser = build_parser()
    args, leftover = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing", None)
    if leftover and (trailing is None or any(word.startswith("-") for word in leftover)):
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    if leftover:
        getattr(args, trailing).extend(leftover)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        args.handler(args)
    except UserError as error:
        print(f"dinov3ds: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinov3ds: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
