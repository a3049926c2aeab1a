"""The `dinov3ds` command: parses arguments and dispatches; the work lives in the library modules.

A `UserError` (bad file, bad config, missing weights) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from dinov3ds.commands import handlers
from dinov3ds.errors import DataWarning, UserError


class _Mistake(Exception):
    """A command line argparse refuses (not argparse's own ArgumentError, which argparse catches itself)."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors come back to `parse_arguments` (to be told as one line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _Mistake(f"{message} (see {self.prog} --help)")


def _add_backbone_arguments(parser: argparse.ArgumentParser, image_size: int) -> None:
    parser.add_argument("--backbone", default="vits16", help="variant name (see `dinov3ds backbones`)")
    parser.add_argument("--weights", default=None,
                        help="Meta .pth, timm/transformers .safetensors or folder, hf-hub:<repo>, or 'random' "
                             "(default: checkpoints/, then the Hugging Face cache)")
    parser.add_argument("--checkpoint", default=None,
                        help="a dinov3ds checkpoint: use its backbone as trained (LoRA, unfrozen blocks) instead of "
                             "--backbone/--weights")
    parser.add_argument("--image-size", type=int, default=image_size,
                        help="shorter side in pixels (rounded to a multiple of the patch size)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="backbone weight/compute dtype (auto: bfloat16 on a GPU or CPU that computes it "
                             "natively: AMX, AVX512-BF16, Arm BF16; else float32; bfloat16 halves the memory)")  # fmt: skip
    _add_device_argument(parser)


def _add_device_argument(parser: argparse.ArgumentParser, float32: bool = False) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (the first GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    if float32:
        parser.add_argument("--float32", action="store_true",
                            help="run the backbone in float32 (auto picks bfloat16 on GPUs and CPUs that compute it "
                                 "natively)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinov3ds", description="DINOv3 classifiers and segmenters.")
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
    train.set_defaults(handler=handlers.run_train, trailing="overrides")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its configured validation split")
    evaluate.add_argument("--checkpoint", required=True, help="a dinov3ds head checkpoint (best.ckpt or last.ckpt)")
    evaluate.add_argument("--out", default=None,
                          help="folder for the metrics (default: beside the checkpoint, e.g. checkpoints/best_eval/)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace metric files already in that folder")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=... inference.mode=slide")
    _add_device_argument(evaluate, float32=True)
    evaluate.set_defaults(handler=handlers.run_eval, trailing="overrides")

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
    predict.add_argument("--labels", default=None,
                         help="volumes: label volume (or folder) for per-class Dice, IoU, HD95 and surface Dice")
    predict.add_argument("--probabilities", action="store_true", help="volumes: also write class probabilities")
    predict.add_argument("--devices", type=int, default=1,
                         help="volumes: processes to spread them over, one per GPU (or CPU processes with --device cpu)")
    predict.add_argument("--resume", action="store_true",
                         help="volumes: skip those whose prediction is already in --out (a rerun after a kill)")
    predict.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # deprecated: key=value
    _add_device_argument(predict, float32=True)
    predict.set_defaults(handler=handlers.run_predict, trailing="paths")

    download = commands.add_parser("download", help="download and extract a dataset")
    download.add_argument("name", help="imagenette2, imagenette2-320, imagenette2-160, ade20k or nyu-depth-v2 "
                          "(NYU's labeled .mat + Eigen's splits.mat, converted once to ROOT/nyu_depth_v2)")  # fmt: skip
    download.add_argument("--root", default="data", help="folder to download into")
    download.add_argument("--url", default=None, help="mirror URL of the same archive; nyu-depth-v2: a base URL "
                          "holding nyu_depth_v2_labeled.mat and splits.mat under those names")  # fmt: skip
    download.set_defaults(handler=handlers.run_download)

    backbones = commands.add_parser("backbones", help="list DINOv3 variants and which of their weights are on this machine")
    backbones.set_defaults(handler=handlers.run_backbones)

    demo = commands.add_parser("demo", help="end-to-end demo on generated data")
    demo.add_argument("--out", default="output/demo", help="folder for the generated data and the runs")
    demo.add_argument("--backbone", default="vits16", help="variant; its Meta weights are used when in checkpoints/")
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer epochs")
    demo.set_defaults(handler=handlers.run_demo)

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
    prepare.set_defaults(handler=handlers.run_prepare_volumes)

    export = commands.add_parser("export", help="export backbone + head as ONNX or TorchScript, checked against PyTorch")
    export.add_argument("--checkpoint", required=True, help="a dinov3ds head checkpoint")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="graph format")
    export.add_argument("--out", required=True,
                        help="the graph file; ONNX holds its preprocessing and class names (TorchScript: <out>.json)")
    export.add_argument("--height", type=int, default=None,
                        help="fix the input height (ONNX default: any size; TorchScript: data.image_size)")
    export.add_argument("--width", type=int, default=None,
                        help="fix the input width (ONNX default: any size; TorchScript: data.image_size)")
    export.add_argument("--half", action="store_true",
                        help="ONNX in float16 (RoPE, attention logits, softmax and LayerNorm kept in float32)")
    export.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)  # the batch is always dynamic
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_device_argument(export)
    export.set_defaults(handler=handlers.run_export)

    features = commands.add_parser("features", help="dump CLS / pooled / patch features of images (.npz or shards)")
    features.add_argument("paths", nargs="+", help="images or folders")
    features.add_argument("--out", required=True,
                          help="a .npz file, or a folder for sharded features (resumable, split over --devices)")
    features.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    features.add_argument("--no-patches", action="store_true", help="skip the [N,C,h,w] patch features")
    features.add_argument("--overwrite", action="store_true", help="replace an existing .npz or shard folder")
    features.add_argument("--devices", type=int, default=1,
                          help="sharded: processes to start, one per GPU (or CPU processes with --device cpu)")
    features.add_argument("--shard-size", type=int, default=1024, help="sharded: images per shard file")
    features.add_argument("--workers", type=int, default=2, help="image-decoding worker processes per device")
    _add_backbone_arguments(features, 224)
    features.set_defaults(handler=handlers.run_features)

    pca = commands.add_parser("pca", help="PCA-of-patch-features picture per image")
    pca.add_argument("paths", nargs="+", help="images or folders")
    pca.add_argument("--out", default="output/pca", help="folder for the <name>_pca.png pictures")
    _add_backbone_arguments(pca, 448)
    pca.set_defaults(handler=handlers.run_pca)

    knn = commands.add_parser("knn", help="k-NN classification (DINO's weighted votes) on an image-folder dataset")
    knn.add_argument("--root", required=True, help="folder with train/<class>/ and val/<class>/")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (at most the training images)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T); T > 0")
    knn.add_argument("--pooling", choices=["cls", "avg", "cls+avg"], default="cls+avg", help="which features vote")
    _add_backbone_arguments(knn, 224)
    knn.set_defaults(handler=handlers.run_knn)

    check = commands.add_parser("check-data", help="decode every image and mask of a config's dataset; list all problems")
    check.add_argument("--config", required=False, help="the YAML config training would use")
    check.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count, at most 8)")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=...")
    check.set_defaults(handler=handlers.run_check_data, trailing="overrides")

    report = commands.add_parser("report", help="rebuild a run's report.html, or compare runs on one page")
    report.add_argument("runs", nargs="+", metavar="RUN", help="train output_dir or eval --out folders")
    report.add_argument("--out", default=None,
                        help="the page (.html); default RUN/report.html for one run, required to compare several")
    report.add_argument("--overwrite", action="store_true", help="replace an existing --out page")
    report.set_defaults(handler=handlers.run_report)

    configs = commands.add_parser("configs", help="list the bundled configs, or copy one out to edit")
    configs.add_argument("action", nargs="?", choices=["list", "copy"], default="list", help="list (default) or copy")
    configs.add_argument("name", nargs="?", help="copy: the bundled config's name")
    configs.add_argument("destination", nargs="?", metavar="DEST", help="copy: a file or folder (default ./NAME.yaml)")
    configs.set_defaults(handler=handlers.run_configs)
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


class _ShownOnce(logging.Filter):
    """A dinov3ds log line whose text was just shown as a Python warning (-v shows warnings) is not shown again."""

    def __init__(self) -> None:
        super().__init__()
        self.warned: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.name == "py.warnings":
            self.warned = [*self.warned[-20:], text]
            return True
        return not (record.name.startswith("dinov3ds") and any(text in warned for warned in self.warned))


def _print_each_line_once(verbose: bool) -> None:
    """Lightning's "lightning" logger prints through a handler of its own and also passes each line up to the root
    handler: every Lightning line came twice. It keeps its own. With -v (library warnings shown), warnings go
    through logging so a dinov3ds line that repeats a warning's text is not shown again (without -v the
    warnings that have such a line are hidden, and the others are left to Python's own display)."""
    logging.getLogger("lightning").propagate = False
    if verbose:
        logging.captureWarnings(True)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ShownOnce())


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
    --out o key=value`) join the command's list of inputs or overrides instead of being refused, and so do
    the words after `--`, whatever they start with. A mistake is a UserError (one line, exit 2); a file whose
    name starts with '-' (which argparse reads as an option) is named, with the two ways to pass it."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, leftover = build_parser().parse_known_args(argv)
        before, after = (leftover[: leftover.index("--")], leftover[leftover.index("--") + 1 :]) if "--" in leftover \
            else (leftover, [])  # fmt: skip
        trailing = getattr(args, "trailing", None)
        if leftover and (trailing is None or any(word.startswith("-") for word in before)):
            raise _Mistake(f"unrecognized arguments: {' '.join(leftover)} (see dinov3ds {args.command} --help)")
    except _Mistake as error:
        options = argv[: argv.index("--")] if "--" in argv else argv
        dashed = next((word for word in options if word[:1] == "-" and len(word) > 1 and Path(word).exists()), None)
        message = (f"{dashed} is a file whose name starts with '-', read as an option; put inputs after -- "
                   f"(... -- {dashed}) or write ./{dashed}" if dashed else str(error))  # fmt: skip
        raise UserError(message) from None
    if leftover:
        getattr(args, trailing).extend([*before, *after])
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except UserError as error:
        print(f"dinov3ds: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    _print_each_line_once(args.verbose)
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
