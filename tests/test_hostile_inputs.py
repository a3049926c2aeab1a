"""A corpus of bad inputs, hostile files and faults, each through the real CLI entry point.

For every case: exit code 2, one line on stderr naming the file or key (and no traceback), no file outside
the output folder the command was told to use changed (the whole workspace is hashed before and after),
and no code from a file ever ran (the pickle payloads would create a marker file).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data.synthetic import make_classification_folder, make_head_phantom, make_segmentation_folder
from tests.checkpoints import write_official_checkpoint
from tests.cli_helpers import serve_folder
from tests.conftest import tiny

MARKER = "payload-ran"


class Payload:
    """Unpickling this creates the marker file: proof that a pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Workspace:
    root: Path
    classification_checkpoint: Path
    segmentation_checkpoint: Path
    classification_data: Path
    segmentation_data: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    base = tmp_path_factory.mktemp("trained")
    cls_data = make_classification_folder(base / "cls", num_classes=2, train_per_class=2, val_per_class=1, size=32)
    seg_data = make_segmentation_folder(base / "seg", num_classes=3, train=2, val=2, size=(32, 32))
    assert main(["train", *tiny("trainer.max_epochs=1", f"data.root={cls_data}"), f"output_dir={base / 'c'}"]) == 0
    assert main(["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={seg_data}",
                                "data.num_classes=3", "data.batch_size=2", "head.name=linear", "trainer.max_epochs=1"),
                 f"output_dir={base / 's'}"]) == 0  # fmt: skip
    return base / "c" / "checkpoints" / "best.ckpt", base / "s" / "checkpoints" / "best.ckpt", cls_data, seg_data


@pytest.fixture
def workspace(tmp_path, trained) -> Workspace:
    """Copies of the checkpoints and data inside this test's folder, so the tree hash covers them."""
    import shutil

    cls_ckpt, seg_ckpt, cls_data, seg_data = trained
    (tmp_path / "ckpt").mkdir()
    shutil.copy(cls_ckpt, tmp_path / "ckpt" / "cls.ckpt")
    shutil.copy(seg_ckpt, tmp_path / "ckpt" / "seg.ckpt")
    shutil.copytree(cls_data, tmp_path / "cls")
    shutil.copytree(seg_data, tmp_path / "seg")
    return Workspace(tmp_path, tmp_path / "ckpt" / "cls.ckpt", tmp_path / "ckpt" / "seg.ckpt", tmp_path / "cls", tmp_path / "seg")


def tree_hash(root: Path, skip: Path | None) -> dict[str, str]:
    hashes = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def edit_checkpoint(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


def nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def header_bomb(path: Path) -> Path:
    """A 600-byte .nii whose header claims 30000³ float32 voxels."""
    nifti(path, np.zeros((2, 2, 2), np.float32))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(path.read_bytes()))
    header.set_data_shape((30000, 30000, 30000))
    path.write_bytes(bytes(header.binaryblock) + path.read_bytes()[348:])
    return path


def phantom_pair(folder: Path, name: str = "case", image_data: np.ndarray | None = None, label_shape=None) -> None:
    image, label = make_head_phantom((12, 14, 6), seed=0)
    nifti(folder / "images" / f"{name}.nii.gz", np.asarray(image.dataobj) if image_data is None else image_data)
    label_data = np.asarray(label.dataobj)
    nifti(folder / "labels" / f"{name}_seg.nii.gz", label_data if label_shape is None else np.zeros(label_shape, np.uint8))


def prepare(w: Workspace) -> list[str]:
    return ["prepare-volumes", "--images", str(w.root / "vol" / "images"), "--labels", str(w.root / "vol" / "labels"),
            "--out", str(w.root / "out"), "--val-fraction", "0"]  # fmt: skip


def train_cls(w: Workspace, *extra: str) -> list[str]:
    return ["train", *tiny("trainer.max_epochs=1", f"data.root={w.classification_data}"), f"output_dir={w.root / 'out'}", *extra]


def evaluate(w: Workspace, checkpoint: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--out", str(w.root / "out"), *extra]


def predict(w: Workspace, checkpoint: Path, inputs: Path, *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(w.root / "out"), *extra]


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def bomb_yaml(path: Path) -> Path:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for n, p in zip("bcdef", "abcde")]
    return write_text(path, "\n".join(lines) + "\n")


def reshaped_head(c: dict) -> None:
    key = next(k for k in c["state_dict"] if k.startswith("model.head.") and c["state_dict"][k].ndim == 2)
    c["state_dict"][key] = c["state_dict"][key].reshape(-1)[:5].clone()


def bogus_head_name(c: dict) -> None:
    c["dinov3ds"]["config"]["head"]["name"] = "bogus"


def newer_format(c: dict) -> None:
    c["dinov3ds"]["format_version"] = 99


# (case id, how to build the inputs and the command line, the error line must match, the folder it may write)
CASES: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    # -- configs and overrides
    ("unknown-key", lambda w: train_cls(w, "data.bogus=1"), r"override data\.bogus=1: unknown key 'data\.bogus'"),
    ("batch-size-zero", lambda w: train_cls(w, "data.batch_size=0"), r"'data\.batch_size': Input should be greater than or equal to 1"),
    ("negative-lr", lambda w: train_cls(w, "optim.lr=-1"), r"'optim\.lr': Input should be greater than 0"),
    ("stride-zero", lambda w: train_cls(w, "inference.stride=0"), r"'inference\.stride'"),
    ("huge-image-size", lambda w: train_cls(w, "data.image_size=" + "9" * 30), r"'data\.image_size': Input should be less than or equal to 16384"),
    ("negative-workers", lambda w: train_cls(w, "data.num_workers=-1"), r"'data\.num_workers'"),
    ("huge-num-classes", lambda w: train_cls(w, "data.num_classes=" + "9" * 30), r"'data\.num_classes'"),
    ("num-classes-contradicts-data", lambda w: train_cls(w, "data.num_classes=5"), r"data\.num_classes says 5 classes but .* has 2 class folders"),
    ("broken-yaml-override", lambda w: train_cls(w, "data.image_size=[32"), r"override data\.image_size=\[32 is not valid YAML"),
    ("alias-bomb", lambda w: ["train", "--config", str(bomb_yaml(w.root / "bomb.yaml"))], r"bomb\.yaml: expands to more than"),
    ("binary-config", lambda w: ["train", "--config", str(write_text(w.root / "x.yaml", os.urandom(64) + b"\xff"))], r"x\.yaml is not a UTF-8 text file"),
    ("config-not-a-mapping", lambda w: ["train", "--config", str(write_text(w.root / "l.yaml", "- 1\n- 2\n"))], r"l\.yaml must hold a mapping"),
    ("missing-config", lambda w: ["train", "--config", str(w.root / "none.yaml")], r"none\.yaml not found"),
    ("no-config", lambda w: ["train"], r"train needs --config"),
    ("missing-data-root", lambda w: train_cls(w, f"data.root={w.root / 'nowhere'}"), r"data\.root .*nowhere does not exist"),
    ("unknown-segmentation-head", lambda w: ["train", *tiny("task=segmentation", "head.name=bogus", f"data.root={w.segmentation_data}",
                                                        "data.dataset=segmentation_folder", "data.num_classes=3"),
                                             f"output_dir={w.root / 'out'}"], r"head 'bogus' is unknown"),  # fmt: skip
    # -- images and masks
    ("truncated-jpeg", lambda w: train_cls(w) if truncate(next((w.classification_data / "train").rglob("*.JPEG")), 200) else [],
     r"cannot read image .*\.JPEG"),
    ("text-as-image", lambda w: train_cls(w) if write_text(next((w.classification_data / "train").rglob("*.JPEG")), "not an image") else [],
     r"cannot read image"),
    ("extreme-aspect-image", lambda w: predict(w, w.segmentation_checkpoint, save_image(w.root / "strip.png", (2000, 1))),
     r"strip\.png is 2000x1, more than 32 times longer"),
    ("colour-mask", lambda w: train_seg(w) if recolour_mask(w) else [], r"stores colours \(RGB\)"),
    ("mask-size-mismatch", lambda w: train_seg(w) if resize_mask(w) else [], r"masks must match their image's size"),
    ("mask-label-out-of-range", lambda w: train_seg(w) if relabel_mask(w) else [], r"has label values \[9\] outside 0\.\.2"),
    # -- volumes
    ("nifti-header-bomb", lambda w: prepare(w) if (header_bomb(w.root / "vol" / "images" / "case.nii"),
                                                   nifti(w.root / "vol" / "labels" / "case_seg.nii.gz", np.zeros((2, 2, 2), np.uint8))) else [],
     r"case\.nii: its header declares 30000 x 30000 x 30000"),  # fmt: skip
    ("four-d-volume", lambda w: prepare(w) if phantom_pair(w.root / "vol", image_data=np.zeros((4, 4, 4, 3), np.float32)) is None else [],
     r"expected a 3D volume"),
    ("nan-volume", lambda w: prepare(w) if phantom_pair(w.root / "vol", image_data=np.full((12, 14, 6), np.nan, np.float32)) is None else [],
     r"NaN/Inf"),
    ("volume-shape-mismatch", lambda w: prepare(w) if phantom_pair(w.root / "vol", label_shape=(12, 14, 5)) is None else [],
     r"has shape \(12, 14, 6\) but its label .* has shape \(12, 14, 5\)"),
    ("missing-label-volume", lambda w: prepare(w) if nifti(w.root / "vol" / "images" / "x.nii.gz", np.zeros((4, 4, 4), np.float32))
     and (w.root / "vol" / "labels").mkdir() is None else [], r"x\.nii\.gz: no label volume"),
    # -- checkpoints
    ("pickled-checkpoint", lambda w: evaluate(w, pickled(w)), r"refused to load .*evil\.ckpt: it contains Python objects"),
    ("truncated-checkpoint", lambda w: evaluate(w, truncate(w.classification_checkpoint, 300)), r"cannot read checkpoint .*cls\.ckpt: truncated"),
    ("checkpoint-without-state-dict", lambda w: evaluate(w, edit_checkpoint(w.classification_checkpoint, w.root / "e.ckpt",
                                                                            lambda c: c.pop("state_dict"))),
     r"e\.ckpt is an incomplete dinov3ds checkpoint \(TypeError: no state_dict\)"),  # fmt: skip
    ("checkpoint-reshaped-head", lambda w: evaluate(w, edit_checkpoint(w.classification_checkpoint, w.root / "r.ckpt", reshaped_head)),
     r"r\.ckpt: its head weights do not fit the head its own config describes"),
    ("checkpoint-bogus-head-name", lambda w: evaluate(w, edit_checkpoint(w.segmentation_checkpoint, w.root / "b.ckpt", bogus_head_name)),
     r"b\.ckpt: head 'bogus' is unknown"),
    ("checkpoint-newer-format", lambda w: evaluate(w, edit_checkpoint(w.classification_checkpoint, w.root / "n.ckpt", newer_format)),
     r"n\.ckpt has checkpoint format 99, newer than this dinov3ds understands"),
    ("plain-state-dict", lambda w: evaluate(w, save_tensors(w.root / "plain.ckpt")), r"plain\.ckpt is not a dinov3ds checkpoint"),
    ("classification-checkpoint-as-volume-model", lambda w: predict(w, w.classification_checkpoint,
                                                                     nifti(w.root / "v.nii.gz", np.zeros((4, 4, 4), np.float32))),
     r"cls\S*\.ckpt is a classification checkpoint and cannot segment volumes such as \S*v\.nii\.gz"),  # fmt: skip
    # -- where outputs go
    ("eval-out-is-a-file", lambda w: ["eval", "--checkpoint", str(w.classification_checkpoint), "--out",
                                      str(write_text(w.root / "out", "a file"))], r"--out .*out is a file"),  # fmt: skip
    ("eval-would-overwrite", lambda w: evaluate(w, w.classification_checkpoint) if write_text(w.root / "out" / "eval_metrics.json", "{}") else [],
     r"eval_metrics\.json already exists; pass --overwrite"),
    ("predict-out-read-only", lambda w: ["predict", "--checkpoint", str(w.segmentation_checkpoint),
                                         str(save_image(w.root / "a.png", (32, 32))), "--out", "/proc/dinov3ds-test"],
     r"cannot create /proc/dinov3ds-test"),  # fmt: skip
    ("predict-topk-zero", lambda w: predict(w, w.classification_checkpoint, w.classification_data / "val", "--topk", "0"),
     r"--topk 0: give 1 or more"),
    ("train-over-an-earlier-run", lambda w: train_cls(w) if (w.root / "out" / "checkpoints").mkdir(parents=True) is None else [],
     r"already holds a run \(checkpoints\); continue it with --resume"),
    ("resume-without-a-run", lambda w: ["train", "--resume", *train_cls(w)[1:]], r"--resume: .*last\.ckpt does not exist"),
    ("features-out-is-neither-npz-nor-folder", lambda w: ["features", "--weights", "random", str(w.classification_data / "val"), "--out", str(w.root / "out.txt")],
     r"--out .*out\.txt: sharded features go to a folder"),
    ("knn-k-zero", lambda w: ["knn", "--weights", "random", "--root", str(w.classification_data), "--k", "0"], r"--k 0: the number of neighbours"),
    ("knn-k-negative", lambda w: ["knn", "--weights", "random", "--root", str(w.classification_data), "--k", "-3"], r"--k -3"),
    ("knn-temperature-zero", lambda w: ["knn", "--weights", "random", "--root", str(w.classification_data), "--temperature", "0"],
     r"--temperature 0\.0: it divides the similarities"),
    # -- weight files
    ("weights-of-another-variant", lambda w: train_cls(w, f"backbone.weights={official(w, 'vitb16')}", "backbone.overrides={depth: 1}"),
     r"holds a DINOv3 ViT of width 768.*expects a vit of width 384"),
    ("weights-hash-mismatch", lambda w: train_cls(w, f"backbone.weights={renamed_official(w)}"), r"is corrupt or not the official file"),
    ("weights-named-official-but-truncated", lambda w: train_cls(w, f"backbone.weights={truncate(official(w, 'vits16'), 1000)}"),
     r"is corrupt or not the official file: its name says SHA-256"),
    ("weights-truncated", lambda w: train_cls(w, f"backbone.weights={truncated_copy(w)}"), r"cannot read .*cut\.pth: the file is truncated"),
    ("weights-pickle", lambda w: train_cls(w, f"backbone.weights={pickled(w, 'w.pth')}"), r"refused to load .*w\.pth: it contains Python objects"),
    ("weights-garbage-safetensors", lambda w: train_cls(w, f"backbone.weights={write_text(w.root / 'g.safetensors', b'xxxxxxxxxxxx')}"),
     r"cannot read .*g\.safetensors: truncated or not a safetensors file"),
    ("hub-id-offline-not-cached", lambda w: train_cls(w, "backbone.weights=hf-hub:facebook/dinov3-vitb16-pretrain-lvd1689m"),
     r"facebook/dinov3-vitb16-pretrain-lvd1689m is not in the Hugging Face cache"),
]  # fmt: skip


def save_image(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (90, 40, 200)).save(path)
    return path


def save_tensors(path: Path) -> Path:
    torch.save({"weight": torch.zeros(2)}, path)
    return path


def pickled(w: Workspace, name: str = "evil.ckpt") -> Path:
    path = w.root / name
    torch.save({"dinov3ds": Payload(w.root / MARKER), "state_dict": {}}, path)
    return path


def official(w: Workspace, name: str) -> Path:
    return write_official_checkpoint(name, w.root / "weights", depth=1)


def truncated_copy(w: Workspace) -> Path:
    target = w.root / "cut.pth"
    target.write_bytes(official(w, "vits16").read_bytes()[:1000])
    return target


def renamed_official(w: Workspace) -> Path:
    path = official(w, "vits16")
    target = path.with_name("dinov3_vits16_pretrain_lvd1689m-00000000.pth")
    path.rename(target)
    return target


def train_seg(w: Workspace) -> list[str]:
    return ["train", *tiny("task=segmentation", "data.dataset=segmentation_folder", f"data.root={w.segmentation_data}",
                           "data.num_classes=3", "data.batch_size=2", "trainer.max_epochs=1"), f"output_dir={w.root / 'out'}"]  # fmt: skip


def first_mask(w: Workspace) -> Path:
    return sorted((w.segmentation_data / "annotations" / "train").glob("*.png"))[0]


def recolour_mask(w: Workspace) -> bool:
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[..., 0] = 200
    Image.fromarray(mask).save(first_mask(w))
    return True


def resize_mask(w: Workspace) -> bool:
    Image.new("L", (5, 7)).save(first_mask(w))
    return True


def relabel_mask(w: Workspace) -> bool:
    Image.new("L", (32, 32), 9).save(first_mask(w))
    return True


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_refused(argv: list, root: Path, message: str, capsys: pytest.CaptureFixture) -> None:
    """The corpus's contract for one row (every round's file runs its rows through this): `argv` through the
    real CLI exits 2 with one `dinov3ds: error:` line matching `message` and no traceback; no file under
    `root` outside `root/out` changed; no pickle payload ran."""
    before = tree_hash(root, root / "out")
    capsys.readouterr()
    code = main([str(part) for part in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dinov3ds: error: ")]
    assert code == 2, f"exit {code}; stderr: {err[-800:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-800:]
    assert re.search(message, lines[0]), lines[0]
    assert tree_hash(root, root / "out") == before, "a file outside the output folder changed"
    assert not (root / MARKER).exists(), "a pickle payload ran"


@pytest.mark.parametrize("case, build, message", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, build, message, workspace, offline, capsys):
    assert_refused(build(workspace), workspace.root, message, capsys)


def test_the_corpus_is_large():
    assert len(CASES) >= 40


def test_a_full_disk_is_one_line_and_keeps_the_earlier_run(tmp_path, capsys):
    """A 3 MB tmpfs: the first run fits, the resumed one fills the disk; last.ckpt and metrics.csv survive."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        data = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1, size=32)
        args = ["train", *tiny(f"data.root={data}", "data.batch_size=2", "trainer.log_every_n_steps=1",
                               "cache_features=false"), f"output_dir={disk / 'run'}"]  # fmt: skip
        assert main([*args, "trainer.max_epochs=1"]) == 0
        last = (disk / "run" / "checkpoints" / "last.ckpt").read_bytes()
        history = (disk / "run" / "metrics.csv").read_text()
        (disk / "filler").write_bytes(b"\0" * (disk.stat().st_size or 0))  # touch the mount
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * max(free - 4096, 0))
        capsys.readouterr()
        assert main(["train", "--resume", *args[1:], "trainer.max_epochs=6"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("dinov3ds: error: ") and ("No space left on device" in line or "free disk space" in line), line
        assert (disk / "run" / "checkpoints" / "last.ckpt").read_bytes() == last
        # The rows from before are in metrics.csv, or (when even merging them back found no space) still set
        # aside in metrics.csv.previous, where the next --resume takes them from.
        kept = "".join(p.read_text() for p in (disk / "run").glob("metrics.csv*"))
        assert all(row in kept for row in history.splitlines()[1:]), kept
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_an_archive_with_the_wrong_checksum_is_refused_and_nothing_extracted(tmp_path, capsys):
    payload = tmp_path / "served"
    payload.mkdir()
    with tarfile.open(payload / "evil.tgz", "w:gz") as archive:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    with serve_folder(payload) as url:
        code = main(["download", "imagenette2-160", "--root", str(tmp_path / "data"), "--url", f"{url}/evil.tgz"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "MD5" in line.upper()
    assert not (tmp_path / "escaped.txt").exists() and not list((tmp_path / "data").rglob("*.txt"))
