"""Plant each bug from issue 23 in the source, one at a time, and check that its test now fails.

    python tests/mutation/planted_bugs.py            # every bug; prints a table, exit 1 if one survives
    python tests/mutation/planted_bugs.py dice-fp32  # one bug by name

Each bug is an exact text replacement in one source file; the file is restored afterwards whatever happens.
Not collected by pytest (the file name does not start with test_): it runs the suite, not inside it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "dinov3ds"


@dataclass(frozen=True)
class PlantedBug:
    name: str
    file: str  # relative to src/dinov3ds
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail with the bug


BUGS = [
    PlantedBug("jitter-after-normalise", "data/transforms.py",
               "            picture = self.distortion(picture)\n        picture = self.normalize(picture)\n",
               "            pass\n        picture = self.normalize(picture)\n        if self.distortion is not None:\n"
               "            picture = self.distortion(picture)\n",
               ("tests/test_data.py::test_photometric_jitter_runs_before_normalisation",)),
    PlantedBug("cache-key-without-size", "training/feature_cache.py", "stat.st_size, stat.st_mtime_ns", "stat.st_mtime_ns",
               ("tests/test_feature_cache.py::test_edited_image_with_restored_mtime_is_recomputed_by_its_size",)),
    PlantedBug("cache-key-without-mtime", "training/feature_cache.py", "stat.st_size, stat.st_mtime_ns", "stat.st_size",
               ("tests/test_feature_cache.py::test_edited_image_of_the_same_size_is_recomputed_by_its_mtime",)),
    PlantedBug("cache-key-without-transform", "training/feature_cache.py",
               '        "transform": repr(getattr(dataset, "transform", None)),\n', "",
               ("tests/test_feature_cache.py::test_changed_crop_is_recomputed",)),
    PlantedBug("store-reads-the-last-block-only", "training/feature_cache.py", "cls[:, blocks.index(layer)]",
               "cls[:, -1]", ("tests/test_feature_cache.py::test_changed_last_blocks_is_recomputed",)),
    PlantedBug("slide-width-stride-unchecked", "models/inference.py", "if stride_h > crop_h or stride_w > crop_w:",
               "if stride_h > crop_h:", ("tests/test_inference.py::test_slide_rejects_bad_settings",)),
    PlantedBug("slide-default-width-stride-from-height", "models/inference.py",
               "max(crop_w * 2 // 3, 1))", "max(crop_h * 2 // 3, 1))",
               ("tests/test_inference.py::test_run_inference_default_stride_follows_each_side_of_a_non_square_crop",)),
    PlantedBug("tta-softmax-before-resize", "models/inference.py",
               "view_probs = _resize(logits, (height, width)).softmax(dim=1)",
               "view_probs = _resize(logits.softmax(dim=1), (height, width))",
               ("tests/test_inference.py::test_multi_scale_tta_resizes_logits_then_takes_the_softmax",)),
    PlantedBug("eval-resize-straight-to-crop", "data/transforms.py",
               "v2.Resize(round(size / crop_ratio), antialias=True)", "v2.Resize(size, antialias=True)",
               ("tests/test_data.py::test_classification_eval_transform_resizes_to_size_over_crop_ratio_first",)),
    PlantedBug("base-size-larger-crop-side", "data/transforms.py",
               "base_size if base_size is not None else min(self.crop_size)",
               "base_size if base_size is not None else max(self.crop_size)",
               ("tests/test_data.py::test_default_base_size_is_the_crops_shorter_side",)),
    PlantedBug("segdino-fuse-at-last-tap", "heads/segdino.py", "size = first.shape[-2:]",
               "size = features[-1].shape[-2:]", ("tests/test_heads.py::test_segdino_fuses_at_the_first_taps_resolution",)),
    PlantedBug("segdino-align-corners", "heads/segdino.py",
               'F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)',
               'F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)',
               ("tests/test_heads.py::test_segdino_output_by_hand",)),
    PlantedBug("dice-without-fp32", "training/losses.py", "        logits = logits.float()  # pixel sums", "        # pixel sums",
               ("tests/test_losses.py::test_dice_in_bf16_is_computed_in_float32",)),
    PlantedBug("teacher-prefix-kept", "models/weights/files.py", '{k.removeprefix("backbone."): v for k, v', "{k: v for k, v",
               ("tests/test_backbones.py::test_training_checkpoint_teacher_layout_loads_like_the_plain_file",)),
    PlantedBug("non-tensor-values-accepted", "models/weights/files.py",
               "if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):",
               "if not isinstance(state, dict):",
               ("tests/test_backbones.py::test_state_dict_with_a_non_tensor_value_is_refused",)),
    PlantedBug("task-check-skipped", "models/checkpoints.py", "if expected_task and meta", "if False and meta",
               ("tests/test_engine.py::test_learning_rate_grid_keeps_the_best_head",)),
]  # fmt: skip


def caught(bug: PlantedBug) -> bool:
    """True when at least one of the bug's tests fails with the bug in place."""
    path = SOURCE / bug.file
    original = path.read_text()
    if original.count(bug.old) != 1:
        raise SystemExit(f"{bug.name}: the text to replace occurs {original.count(bug.old)} times in {path}")
    try:
        path.write_text(original.replace(bug.old, bug.new))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
                             cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    finally:
        path.write_text(original)
    return run.returncode != 0


def main(names: list[str]) -> int:
    chosen = [bug for bug in BUGS if not names or bug.name in names]
    survivors = 0
    for bug in chosen:
        verdict = "caught" if caught(bug) else "SURVIVES"
        survivors += verdict == "SURVIVES"
        print(f"{bug.name:<42} {bug.file:<28} {verdict:<9} {' '.join(t.split('::')[1] for t in bug.tests)}", flush=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} planted bugs caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
