"""`dinov3ds check-data`: scan a config's dataset up front and report every problem at once.

Training finds a broken file only when a batch needs it, possibly hours in, and stops at the first one. This
scan decodes every image and every mask of both splits with the exact loaders training uses, and checks what
training would check later: splits and class folders are not empty, every image has its mask and every mask
its image, a mask has its image's size, and its label values (after `label_map` / `reduce_zero_label`) are
below the number of classes or the ignore index. An nnU-Net / MSD dataset (`data.dataset: nnunet`) is read as
training reads it: dataset.json, the case files, the fold, then every case's channels and label (one grid,
integer label ids dataset.json names). A depth dataset (`task: depth`: depth_folder, nyu) pairs every image with
its depth file and reads both as training does (16-bit PNG or 2-D .npy, the image's own size), and reports each
split's depth range and valid share. Each problem is one line naming the file and the fix. A medical
dataset that passes (nnU-Net, or a prepare-volumes folder) is then fingerprinted, and the report shows the
fingerprint and the settings training would derive from it (data/medical_plan.py).

    report = check_dataset(load_config("configs/my_data.yaml"))
    for line in report.problems: print(line)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from dinov3ds.config import Config
from dinov3ds.data.build import image_loader, resolve_dataset_settings, segmentation_layout
from dinov3ds.data.depth import DEPTH_SUFFIXES, check_depth_size, load_depth, pair_depth_files
from dinov3ds.data.io import IMAGE_EXTENSIONS, find_images, load_image, load_mask
from dinov3ds.data.layout import Pairing
from dinov3ds.data.medical_plan import medical_kind
from dinov3ds.data.nnunet import load_case, read_nnunet
from dinov3ds.data.nyu import RELEASE
from dinov3ds.errors import UserError


@dataclass
class DataReport:
    root: Path
    task: str
    checked: dict[str, int] = field(default_factory=dict)  # split → samples decoded
    problems: list[str] = field(default_factory=list)  # one line each, naming the file and the fix
    unit: str | None = None  # what `checked` counts, when not images or image/mask pairs
    plan: list[str] = field(default_factory=list)  # printed before the count: a medical fingerprint, depth ranges

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The medical plan (when there is one), then the one-line count of what was checked and found."""
        counts = ", ".join(f"{split}: {count}" for split, count in self.checked.items())
        unit = self.unit or {"classification": "images", "depth": "image/depth pairs"}.get(self.task, "image/mask pairs")
        return "\n".join([*self.plan, f"{self.root}: {unit} checked ({counts}); {len(self.problems) or 'no'} problems"])


def _parallel(check: Callable[[object], list[str]], items: Iterable, workers: int) -> list[str]:
    """Decoding releases the GIL in PIL, so threads scale; results keep the items' order."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [line for item in items for line in check(item)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [line for lines in pool.map(check, items) for line in lines]


def _decode_image(path: Path) -> list[str]:
    try:
        load_image(path)
    except UserError as error:
        return [str(error)]
    return []


def _check_classification(config: Config, report: DataReport, workers: int) -> None:
    data = config.data
    classes: dict[str, list[str]] = {}
    for split in dict.fromkeys((data.train_split, data.val_split)):
        folder = report.root / split
        if not folder.is_dir():
            report.problems.append(
                f"split folder {folder} not found; create {folder}/<class>/<images> or set data.{_split_key(config, split)}"
            )
            continue
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            report.problems.append(
                f"split folder {folder} is empty (no class subfolders); put each class's images in {folder}/<class>/"
            )
            continue
        classes[split] = names
        images: list[Path] = []
        for name in names:
            found = find_images(folder / name)
            if not found:
                report.problems.append(
                    f"class folder {folder / name} has no images; add images or remove the folder "
                    "(data.on_bad_sample=warn skips it)"
                )
            images += found
        report.checked[split] = len(images)
        report.problems += _parallel(_decode_image, images, workers)
    if len(classes) == 2 and len(set(map(tuple, classes.values()))) == 2:
        differ = sorted(set(classes[data.train_split]) ^ set(classes[data.val_split]))
        report.problems.append(
            f"{report.root}: train and val class folders differ ({differ}); both splits need the same class folders"
        )


def _split_key(config: Config, split: str) -> str:
    return "train_split" if split == config.data.train_split else "val_split"


def _orphans(pairing: Pairing, image_root: Path, mask_root: Path, suffix: str) -> list[str]:
    """One line per image without its mask and per mask without its image."""
    problems = [
        f"image {image} has no mask (expected {mask}); add the mask or remove the image "
        "(data.on_bad_sample=warn skips it)"
        for image, mask in pairing.images_without_mask
    ]
    extensions = "|".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
    problems += [
        f"mask {mask} has no image (expected {image_root / mask.relative_to(mask_root).parent}/"
        f"{mask.name.removesuffix(suffix)}.<{extensions}>); add the image or remove the mask "
        "(data.on_bad_sample=warn skips it)"
        for mask in pairing.masks_without_image
    ]
    return problems


def _check_segmentation(config: Config, report: DataReport, workers: int) -> None:
    layout, splits = segmentation_layout(config)
    report.root = layout.root
    loader = image_loader(config)

    def check_pair(pair: tuple[Path, Path]) -> list[str]:
        image_path, mask_path = pair
        problems = []
        try:
            image = loader(image_path)
            size = (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[:2])
        except UserError as error:
            problems.append(str(error))
            size = None
        try:
            mask = load_mask(mask_path)
        except UserError as error:
            return [*problems, str(error)]
        if size is not None and mask.shape != size:
            problems.append(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is {size[1]}x{size[0]}; "
                "masks must match their image's size"
            )
        try:  # the dataset's own label processing and range check
            layout.labels.prepare(mask, mask_path)
        except UserError as error:
            problems.append(str(error))
        return problems

    for split in dict.fromkeys(splits):
        image_root, mask_root = layout.image_folder(split), layout.mask_folder(split)
        missing = [folder for folder in (image_root, mask_root) if not folder.is_dir()]
        for folder in missing:
            report.problems.append(f"split folder {folder} not found; create it or fix data.root / data.images_dir / "
                                   "data.annotations_dir / the split names")  # fmt: skip
        if missing:
            continue
        pairing = layout.pair(split)
        report.problems += _orphans(pairing, image_root, mask_root, layout.mask_suffix)
        pairs = pairing.pairs
        if not pairs:
            report.problems.append(f"split {split} is empty: no image/mask pairs under {image_root} and {mask_root}; "
                                   "add data or check data.mask_suffix")  # fmt: skip
        report.checked[split] = len(pairs)
        report.problems += _parallel(check_pair, pairs, workers)


def _check_nnunet(config: Config, report: DataReport, workers: int) -> None:
    """An nnU-Net / MSD dataset: dataset.json, the case files and the fold, then every training case read as
    training reads it (channel grids, label grid, label values); a structural problem stops the scan."""
    data = config.data
    try:
        dataset = read_nnunet(data.root)
        train, val = dataset.split(data.fold, data.val_fraction, config.seed)
    except UserError as error:
        report.problems.append(str(error))
        return

    def check_case(case) -> list[str]:
        try:
            load_case(case, dataset)
        except UserError as error:
            return [str(error)]
        return []

    report.unit, report.checked = "cases", {"train": len(train), "val": len(val)}
    report.problems += _parallel(check_case, [*train, *val], min(workers, 2))  # volumes are large: two at a time


@dataclass
class DepthStats:
    """One split's depth values: pixels in all, known (> 0), within max_depth, and the range of those."""

    pixels: int = 0
    known: int = 0
    valid: int = 0
    low: float = float("inf")
    high: float = 0.0

    def add(self, depth: np.ndarray, max_depth: float) -> None:
        valid = depth[(depth > 0) & (depth <= max_depth) & np.isfinite(depth)]
        self.pixels += depth.size
        self.known += int((depth > 0).sum())
        self.valid += valid.size
        if valid.size:
            self.low, self.high = min(self.low, float(valid.min())), max(self.high, float(valid.max()))

    def line(self, split: str, max_depth: float) -> str:
        share, beyond = self.valid / max(self.pixels, 1), (self.known - self.valid) / max(self.pixels, 1)
        found = f"{self.low:.3g} to {self.high:.3g} m" if self.valid else "none"
        return (f"{split}: depth {found} over valid pixels; {share:.1%} valid (0 < depth <= max_depth {max_depth:g} m), "
                f"{beyond:.1%} beyond max_depth")  # fmt: skip


def _unpaired_depth(folder: Path, pairs: list[tuple[Path, Path]], images: Path) -> list[str]:
    """One line per depth file training never reads: no image of its name, or a second file for one image."""
    read = {depth: image for image, depth in pairs}
    by_stem = {depth.with_suffix(""): depth for depth in read}
    problems = []
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.suffix.lower() not in DEPTH_SUFFIXES or path in read or not path.is_file():
            continue
        used = by_stem.get(path.with_suffix(""))
        problems.append(f"depth file {path} is unused: {used} is read for image {read[used]} (.png before .npy); remove one"
                        if used else f"depth file {path} has no image under {images}; add the image or remove the depth file")  # fmt: skip
    return problems


def _check_depth(config: Config, report: DataReport, workers: int) -> None:
    """Every image with its depth file, both decoded as training decodes them; each split's range and valid share."""
    data, depth = config.data, config.depth
    report.unit, lock = "image/depth pairs", threading.Lock()

    def check_pair(pair: tuple[Path, Path], stats: DepthStats) -> list[str]:
        image_path, depth_path = pair
        problems = []
        try:
            image = load_image(image_path)
        except UserError as error:
            problems.append(str(error))
            image = None
        try:
            values = load_depth(depth_path, depth.depth_scale)
            if image is not None:
                check_depth_size(values, image.width, image.height, depth_path, image_path)
        except UserError as error:
            return [*problems, str(error)]
        with lock:  # decoding runs in threads; the sums one at a time
            stats.add(values, depth.max_depth)
        return problems

    for split in dict.fromkeys((data.train_split, data.val_split)):
        try:
            pairs, missing = pair_depth_files(report.root, split, data.images_dir, depth.depth_dir)
        except UserError as error:
            report.problems.append(f"{error} (expected {report.root / split}/{data.images_dir} and "
                                   f"{report.root / split}/{depth.depth_dir}, or set data.{_split_key(config, split)})")  # fmt: skip
            continue
        report.problems += missing
        report.problems += _unpaired_depth(report.root / split / depth.depth_dir, pairs, report.root / split / data.images_dir)
        stats = DepthStats()
        report.checked[split] = len(pairs)
        report.problems += _parallel(partial(check_pair, stats=stats), pairs, workers)
        report.plan.append(stats.line(split, depth.max_depth))
        if pairs and not stats.valid and stats.pixels:
            report.problems.append(f"split {split}: no pixel has depth within (0, {depth.max_depth:g}] m; check "
                                   "depth.depth_scale (stored values per metre) and depth.max_depth")  # fmt: skip
    eigen = {data.train_split: RELEASE.train, data.val_split: RELEASE.test}
    if data.dataset == "nyu" and any(report.checked.get(split, count) != count for split, count in eigen.items()):
        report.plan.append(f"NYU's Eigen split has {RELEASE.train} train / {RELEASE.test} test images: scores on other "
                           "splits do not compare with the papers'")  # fmt: skip


def check_dataset(config: Config, workers: int | None = None) -> DataReport:
    """Decode and check every sample of the config's train and val splits; never stops at the first problem."""
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    report = DataReport(Path(config.data.root), config.task)
    if not report.root.is_dir():
        report.problems.append(
            f"data.root {report.root} does not exist; download a dataset or point data.root at your folder"
        )
        return report
    if config.task == "classification":
        _check_classification(config, report, workers)
    elif config.task == "depth":
        _check_depth(config, report, workers)
    elif config.data.dataset == "nnunet":
        _check_nnunet(config, report, workers)
    else:
        _check_segmentation(config, report, workers)
    if report.ok and medical_kind(config) is not None:
        try:  # on a copy: check-data changes no setting of the caller's config
            report.plan = resolve_dataset_settings(config.model_copy(deep=True))
        except UserError as error:
            report.problems.append(str(error))
    return report
