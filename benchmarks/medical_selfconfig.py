"""Issue 37's table: three ways a user trains on real MRI, scored by 3D Dice on the held-out case.

Data: the MNI152 2009 T1 template and its grey / white matter probability maps from nilearn (benchmark-only:
`pip install nilearn`; it ships the files, nothing is downloaded), at 2 mm (99 x 117 x 95 voxels; the 1 mm
template costs 4 x the pixels per slice and 2 x the slices, too slow for a 2-core machine). Labels inside
nilearn's brain mask: 1 grey matter, 2 white matter, 3 other brain (neither probability the larger: CSF and
ventricles, 8 % of the brain). Six cases of one nnU-Net v2 raw dataset, each the template changed:
  mni_000  as is                                mni_003  gamma 0.8, bias field along x, noise
  mni_001  mirrored left-right                  mni_004  mirrored, axial slab 5-89, gamma 1.2, bias along y
  mni_002  axial slab 15-79                     mni_005  slab 10-87, gamma 0.9, bias along z, noise (HELD OUT)
(noise: Rician, sigma 2 % of the template's maximum; bias: exp(+-0.2) across the volume). splits_final.json
holds mni_005 out; row 3's prepare-volumes gets the same split (--val mni_005).

Rows, as the issue names them:
  1. data.dataset=nnunet with the defaults (what a new user types);
  2. the same + data.photometric=false data.scale_range=[0.75,1.25];
  3. prepare-volumes slices (axis 2) + configs/segmentation_mri_head.yaml.
Common to all (not augmentation or intensity settings): head.name=unet, random ViT-S/16 weights cut to 4 blocks
(the head's four taps are then blocks 0-3; the head's cost dominates a step on the CPU), optim.lr=1e-3,
trainer.max_steps=600, seed 0, data.batch_size=8, 32-bit on the CPU, no validation before the last step.
Row 3's config is copied with `head: {name: unet}`, the four class names and, at 2 mm, data.image_size /
base_size 128 for its 256. Each model then predicts the held-out volume (`predict --labels`), and its
metrics.json gives the Dice per class.

Run from the repository root: `python benchmarks/medical_selfconfig.py --jobs 3` (the three rows at once, one
thread each; times in README, 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).parent)]

from _common import markdown_table, write_result  # noqa: E402

CLASSES = {"background": 0, "grey_matter": 1, "white_matter": 2, "other_brain": 3}
HELD_OUT = "mni_005"
# (name, mirrored, axial slab, gamma, bias axis, noise)
CASES = [("mni_000", False, None, 1.0, None, False), ("mni_001", True, None, 1.0, None, False),
         ("mni_002", False, (15, 80), 1.0, None, False), ("mni_003", False, None, 0.8, 0, True),
         ("mni_004", True, (5, 90), 1.2, 1, False), ("mni_005", False, (10, 88), 0.9, 2, True)]  # fmt: skip
ROWS = [  # (run folder, the table's words, the arguments)
    ("defaults", "`data.dataset=nnunet` with the defaults", ["data.dataset=nnunet"]),
    ("explicit", "same + `data.photometric=false data.scale_range=[0.75,1.25]`",
     ["data.dataset=nnunet", "data.photometric=false", "data.scale_range=[0.75,1.25]"]),
    ("slices", "`prepare-volumes` slices + `configs/segmentation_mri_head.yaml`", ["--config"]),
]
COMMON = ["task=segmentation", "backbone.weights=random", "backbone.overrides={depth: 4}", "head.name=unet",
          "optim.lr=1e-3", "seed=0", "data.batch_size=8", "data.num_workers=0", "trainer.precision=32",
          "trainer.progress_bar=false", "trainer.check_val_every_n_epoch=1000"]  # fmt: skip


def template(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 x 1000 as float32, class labels uint8, affine) of nilearn's MNI152 2009 template."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    grey = datasets.load_mni152_gm_template(resolution=resolution).get_fdata()
    white = datasets.load_mni152_wm_template(resolution=resolution).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0.5
    other = np.clip(1 - grey - white, 0, 1)
    labels = np.where(brain, np.argmax(np.stack([grey, white, other]), 0) + 1, 0).astype(np.uint8)
    return (1000 * np.clip(t1.get_fdata(), 0, None)).astype(np.float32), labels, t1.affine


def make_case(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, mirrored: bool, slab, gamma: float,
              bias_axis: int | None, noise: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    affine = affine.copy()
    if mirrored:
        image, labels = image[::-1].copy(), labels[::-1].copy()
    if slab is not None:
        image, labels = image[..., slab[0] : slab[1]], labels[..., slab[0] : slab[1]]
        affine[:3, 3] += affine[:3, 2] * slab[0]
    peak = float(image.max())
    image = peak * (image / peak) ** gamma
    if bias_axis is not None:
        ramp = np.linspace(-0.2, 0.2, image.shape[bias_axis])
        image = image * np.exp(ramp.reshape([-1 if a == bias_axis else 1 for a in range(3)]))
    if noise:
        rng = np.random.default_rng(seed)
        sigma = 0.02 * peak
        image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return image.astype(np.float32), labels, affine


def write_datasets(folder: Path, resolution: int) -> tuple[Path, Path]:
    """The nnU-Net raw dataset and a flat copy (images/<case>.nii.gz, labels/<case>.nii.gz) for prepare-volumes
    and for scoring; returns (nnU-Net root, flat root)."""
    import nibabel as nib

    root, flat = folder / "Dataset037_MNI152", folder / "flat"
    for sub in (root / "imagesTr", root / "labelsTr", flat / "images", flat / "labels"):
        sub.mkdir(parents=True, exist_ok=True)
    image, labels, affine = template(resolution)
    for number, (name, *change) in enumerate(CASES):
        case_image, case_labels, case_affine = make_case(image, labels, affine, *change, seed=number)
        for data, paths in ((case_image, (root / "imagesTr" / f"{name}_0000.nii.gz", flat / "images" / f"{name}.nii.gz")),
                            (case_labels, (root / "labelsTr" / f"{name}.nii.gz", flat / "labels" / f"{name}.nii.gz"))):
            for path in paths:
                nib.save(nib.Nifti1Image(data, case_affine), path)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": CLASSES,
                                                   "numTraining": len(CASES), "file_ending": ".nii.gz"}))  # fmt: skip
    train = [name for name, *_ in CASES if name != HELD_OUT]
    (root / "splits_final.json").write_text(json.dumps([{"train": train, "val": [HELD_OUT]}]))
    return root, flat


def mri_head_config(work: Path, resolution: int) -> Path:
    """configs/segmentation_mri_head.yaml with the `unet` head (its `unet_sum` options dropped: an override can only
    add to head.options), this dataset's class names and, at 2 mm, its 256-pixel sizes halved with the voxels
    (the same zoom as at 1 mm)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "segmentation_mri_head.yaml").read_text())
    config["head"] = {"name": "unet"}
    config["data"]["class_names"] = list(CLASSES)  # its own are [background, head]
    config["data"]["image_size"] = config["data"]["base_size"] = 256 // resolution
    path = work / "segmentation_mri_head_unet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_row(folder: str, overrides: list[str], root: Path, flat: Path, work: Path, steps: int, resolution: int) -> dict:
    from dinov3ds.cli import main

    run = work / folder
    if overrides[0] == "--config":
        slices = work / "slice_data"
        shutil.rmtree(slices, ignore_errors=True)
        if main(["prepare-volumes", "--images", str(flat / "images"), "--labels", str(flat / "labels"), "--out",
                 str(slices), "--val", HELD_OUT]) != 0:  # fmt: skip
            sys.exit("prepare-volumes failed")
        arguments = ["train", "--config", str(mri_head_config(work, resolution)), *COMMON, f"data.root={slices}"]
    else:
        arguments = ["train", *COMMON, *overrides, f"data.root={root}"]
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    if main([*arguments, f"trainer.max_steps={steps}", f"output_dir={run}"]) != 0:
        sys.exit(f"training {folder} failed")
    trained = time.perf_counter()
    out = run / "held_out"
    if main(["predict", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), str(flat / "images" / f"{HELD_OUT}.nii.gz"),
             "--labels", str(flat / "labels"), "--out", str(out)]) != 0:  # fmt: skip
        sys.exit(f"predicting {folder} failed")
    summary = json.loads((out / "metrics.json").read_text())
    return {"per_class": summary["per_class"], "train_s": round(trained - started, 1),
            "predict_s": round(time.perf_counter() - trained, 1)}  # fmt: skip


def torch_threads() -> None:
    """Rows trained at once share the cores: one thread each."""
    import torch

    torch.set_num_threads(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per row")
    parser.add_argument("--resolution", type=int, choices=[1, 2], default=2, help="template resolution in mm")
    parser.add_argument("--rows", nargs="+", type=int, choices=[1, 2, 3], default=[1, 2, 3])
    parser.add_argument("--work", type=Path, default=None, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once, one thread each (2 cores: 3)")
    parser.add_argument("--quick", action="store_true", help="60 steps per row (a smoke run: the numbers mean little)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 60
    try:
        import nilearn  # noqa: F401
    except ImportError:
        sys.exit("this benchmark reads the MNI152 template from nilearn: pip install nilearn")

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dinov3ds_mni_") as temporary:
        work = args.work or Path(temporary)
        root, flat = write_datasets(work / "data", args.resolution)
        chosen = [ROWS[number - 1] for number in args.rows]
        jobs = [(folder, overrides, root, flat, work / "runs", args.steps, args.resolution) for folder, _, overrides in chosen]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=torch_threads) as pool:
                done = list(pool.map(run_row, *zip(*jobs, strict=True)))
        else:
            done = [run_row(*job) for job in jobs]
        for (folder, name, _), result in zip(chosen, done, strict=True):
            results[name] = result
            print(f"  {folder}: {json.dumps(result)}", flush=True)
    names = [n for n in CLASSES if n != "background"]
    rows = [[name, *(round(result["per_class"][c]["dice"] or 0.0, 3) for c in names), round(result["train_s"])]
            for name, result in results.items()]  # fmt: skip
    print(f"\nMNI152 at {args.resolution} mm, unet head on random ViT-S/16, {args.steps} steps, 3D Dice on {HELD_OUT}\n")
    print(markdown_table(["how a user runs it", "grey matter", "white matter", "other brain", "train s"], rows))
    path = write_result("medical_selfconfig", {"resolution_mm": args.resolution, "steps": args.steps, "results": results,
                                                "total_s": round(time.perf_counter() - started, 1)})  # fmt: skip
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
