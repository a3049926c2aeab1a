"""Issue 31, round 3, the feature stores: one writer (1), a shard outside the store (13) or listed twice (14),
a full disk while writing (19), an edited shard size (29), a deleted shard (30).

Two stores share the shard format (`data/feature_shards.py`): `dinov3ds features --out folder/`, whose reader
refuses a damaged folder with one line and whose same command rebuilds exactly what was lost; and the training
cache (`training/feature_cache.py`, DINOV3DS_CACHE), which rebuilds a damaged store with one warning line.
The rows run through the CLI as the hostile-inputs corpus does; the rest check the values handed back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.config import load_config
from dinov3ds.data import feature_shards
from dinov3ds.data.build import build_datasets
from dinov3ds.data.feature_shards import ShardFault, checked_shards, publish, read_features, write_shard
from dinov3ds.data.synthetic import make_classification_folder
from dinov3ds.errors import DataWarning, UserError
from dinov3ds.models.backbones import load_backbone
from dinov3ds.models.tasks import Classifier
from dinov3ds.training import run_folder
from dinov3ds.training.feature_cache import cached_features, extract_features, store_key, store_settings
from tests.conftest import tiny
from tests.test_hostile_inputs import assert_refused

COMMON = ["--backbone", "vits16", "--weights", "random", "--image-size", "32", "--batch-size", "2",
          "--workers", "0", "--device", "cpu", "--shard-size", "2"]  # fmt: skip
LIVE = f"1 {socket.gethostname()}\n"  # pid 1 always runs: a lock held by a live run on this machine


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def features(photos: Path, out: Path) -> list[str]:
    return ["features", str(photos), "--out", str(out), *COMMON]


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    """A finished folder: 5 images in shards of 2 (three shards)."""
    out = tmp_path_factory.mktemp("reference") / "feats"
    assert main(features(photos, out)) == 0
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def small_disk(folder: Path, size: str, mounts: list[Path]) -> Path:
    """A tmpfs of `size` at `folder` (unmounted after the test), or a skip where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    mounts.append(folder)
    return folder


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # lazily: memory maps may still be open


def held_out(root: Path, photos: Path, mounts: list[Path]) -> list[str]:
    (root / "out").mkdir()
    (root / "out" / run_folder.LOCK_NAME).write_text(LIVE)
    return features(photos, root / "out")


def full_out(root: Path, photos: Path, mounts: list[Path]) -> list[str]:
    # settings.json and the lock take a page each and a 12.5 kB shard four: the second shard finds no room
    return features(photos, small_disk(root / "out", "24k", mounts))


CASES: list[tuple[str, Callable[[Path, Path, list[Path]], list[str]], str]] = [
    ("r3-01-features-out-held-by-a-running-run", held_out,
     r"--out \S*out is in use by another dinov3ds run \(pid 1\); wait for it to finish or choose another --out"),
    ("r3-19-full-disk-while-features-write", full_out,
     r"--out \S*out: cannot write there \(No space left on device\); free disk space .* run the same command again"),
]  # fmt: skip


@pytest.mark.parametrize("case, build, message", CASES, ids=[case[0] for case in CASES])
def test_store_input_is_one_line_exit_2_and_loses_nothing(case, build, message, photos, tmp_path, mounts, capsys):
    assert_refused(build(tmp_path, photos, mounts), tmp_path, message, capsys)
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob("*.tmp"))


# -- 1: one writer per store


def test_r3_01_the_features_lock_is_the_run_folders_and_is_left_to_its_owner(photos, tmp_path):
    assert feature_shards.LOCK_NAME == run_folder.LOCK_NAME  # claim_settings lets exactly the lock file be there
    out = tmp_path / "out"
    held_out(tmp_path, photos, [])
    assert main(features(photos, out)) == 2
    assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK_NAME]  # nothing claimed, the lock kept
    assert (out / run_folder.LOCK_NAME).read_text() == LIVE
    (out / run_folder.LOCK_NAME).unlink()
    assert main(features(photos, out)) == 0  # a folder holding only a released lock is an empty one
    assert not (out / run_folder.LOCK_NAME).exists()


class Probe:
    """A linear probe's training split and its feature store in the cache: 8 images in shards of 3."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = load_config(None, [*tiny("data.augment=false", "cache.shard_size=3"), f"data.root={root}"])
        backbone = load_backbone("vits16", "random", depth=1)
        splits = build_datasets(self.config, backbone.mean, backbone.std)
        self.model = Classifier(backbone, len(splits.class_names), self.config, splits.class_names)
        self.dataset = splits.train
        settings = store_settings(self.model, self.dataset, self.config)
        self.folder = Path(os.environ["DINOV3DS_CACHE"]) / "features" / store_key(settings)

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        return cached_features(self.model, self.dataset, self.config).tensors

    def assert_fresh(self, features: tuple[torch.Tensor, torch.Tensor]) -> None:
        """What the store handed back is exactly a fresh extraction: no row lost, doubled or foreign."""
        fresh, labels = extract_features(self.model, self.dataset, self.config)
        torch.testing.assert_close(features[0], fresh.half().float(), rtol=0, atol=0)
        assert features[1].tolist() == labels.tolist() == [label for _, label in self.dataset.samples]

    def index(self) -> dict:
        return json.loads((self.folder / "index.json").read_text())

    def write_index(self, index: dict) -> None:
        (self.folder / "index.json").write_text(json.dumps(index))

    def times(self) -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in self.folder.glob("shard-*.safetensors")}


@pytest.fixture
def probe(tmp_path) -> Probe:
    root = make_classification_folder(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1, size=32)
    with pytest.warns(UserWarning, match="RANDOM"):
        return Probe(root)


@pytest.fixture
def stored(probe) -> Probe:
    """The probe with its store written."""
    probe.features()
    assert len(probe.index()["shards"]) == 3
    return probe


def test_r3_01_a_store_another_run_writes_is_left_alone_and_the_run_trains_without_it(probe):
    probe.folder.mkdir(parents=True)
    (probe.folder / run_folder.LOCK_NAME).write_text(LIVE)
    with pytest.warns(DataWarning, match=r"DINOV3DS_CACHE \S+ is in use by another dinov3ds run \(pid 1\).*; training without it"):
        features = probe.features()
    torch.testing.assert_close(features[0], extract_features(probe.model, probe.dataset, probe.config)[0], rtol=0, atol=0)
    assert sorted(p.name for p in probe.folder.iterdir()) == [run_folder.LOCK_NAME]


def test_r3_01_a_launch_of_several_ranks_stops_at_a_busy_store(probe, monkeypatch):
    """Its ranks must all read the same rows, so rank 0 does not train alone without the store."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    probe.folder.mkdir(parents=True)
    (probe.folder / run_folder.LOCK_NAME).write_text(LIVE)
    with pytest.raises(UserError, match=r"is in use by another dinov3ds run \(pid 1\)"):
        probe.features()
    assert sorted(p.name for p in probe.folder.iterdir()) == [run_folder.LOCK_NAME]


def test_r3_01_a_lock_left_by_a_dead_run_is_taken_over_and_released(probe, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    probe.folder.mkdir(parents=True)
    (probe.folder / run_folder.LOCK_NAME).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    with caplog.at_level("WARNING", logger="dinov3ds"):
        probe.assert_fresh(probe.features())
    assert "taking over" in caplog.text
    assert (probe.folder / "index.json").is_file() and not (probe.folder / run_folder.LOCK_NAME).exists()


# -- 13, 14, 29, 30: a finished cache store that was edited is rebuilt, with one warning naming what is off


def rebuilt(probe: Probe, fault: str) -> tuple[torch.Tensor, torch.Tensor]:
    with pytest.warns(DataWarning, match=rf"feature store \S+ \({fault}.*\) is incomplete, corrupt") as caught:
        features = probe.features()
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1
    probe.assert_fresh(features)
    assert checked_shards(probe.folder, probe.index(), 8, 3) == [probe.folder / f"shard-0000{i}.safetensors" for i in range(3)]
    return features


def test_r3_13_an_index_naming_a_shard_outside_the_store_is_never_read(stored, tmp_path):
    outside = tmp_path / "outside.safetensors"  # a well-formed shard of other rows, with a matching record
    write_shard(outside, {"cls": torch.zeros(3, 2, 384), "mean": torch.zeros(3, 384), "labels": torch.ones(3, dtype=torch.long)},
                [p for p, _ in stored.dataset.samples[:3]])  # fmt: skip
    index = stored.index()
    index["shards"][0] = {"name": "../../../outside.safetensors", "bytes": outside.stat().st_size,
                          "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}  # fmt: skip
    stored.write_index(index)
    before = outside.read_bytes()
    rebuilt(stored, r"index.json names shard '\.\./\.\./\.\./outside\.safetensors', not a plain name inside the folder")
    assert outside.read_bytes() == before


@pytest.mark.parametrize("name", ["/etc/passwd", "", "..", "sub/shard-00000.safetensors"])
def test_r3_13_shard_names_are_plain_names_inside_the_folder(stored, name):
    index = stored.index()
    index["shards"][0]["name"] = name
    with pytest.raises(ShardFault, match=re.escape(f"index.json names shard {name!r}, not a plain name inside the folder")):
        checked_shards(stored.folder, index, 8, 3)


def test_r3_14_a_shard_listed_twice_is_refused_and_no_row_doubled(stored):
    index = stored.index()
    index["shards"][1] = index["shards"][0]  # same name, size and hash: only the listing can tell
    stored.write_index(index)
    features = rebuilt(stored, "index.json lists shard-00000.safetensors twice")
    assert features[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_r3_14_a_shard_hard_linked_in_place_of_another_fails_its_hash(stored):
    second = stored.folder / "shard-00001.safetensors"
    second.unlink()
    os.link(stored.folder / "shard-00000.safetensors", second)
    rebuilt(stored, r"shard-00001\.safetensors is not the file index\.json recorded \(size or SHA-256 differ\)")


def test_r3_14_a_symlinked_shard_is_refused_even_with_the_recorded_bytes(stored, tmp_path):
    second = stored.folder / "shard-00001.safetensors"
    shutil.copy(second, tmp_path / "copy.safetensors")
    second.unlink()
    second.symlink_to(tmp_path / "copy.safetensors")
    rebuilt(stored, r"shard-00001\.safetensors is missing \(or not a plain file\)")
    assert not (stored.folder / "shard-00001.safetensors").is_symlink()


def test_r3_29_an_edited_shard_size_is_rebuilt_from_the_shards_that_still_match(stored):
    index, times = stored.index(), stored.times()
    index["shard_size"] = 5
    stored.write_index(index)
    rebuilt(stored, "index.json says 8 rows in shards of 5, settings.json 8 in shards of 3")
    assert stored.times() == times  # every shard matched its record: none extracted again


def test_r3_29_rows_are_checked_against_the_settings_too(stored):
    index = stored.index()
    index["rows"] = 6
    with pytest.raises(ShardFault, match="index.json says 6 rows in shards of 3, settings.json 8 in shards of 3"):
        checked_shards(stored.folder, index, 8, 3)


def test_r3_30_a_deleted_shard_is_extracted_again_and_only_it(stored):
    times = stored.times()
    (stored.folder / "shard-00001.safetensors").unlink()
    rebuilt(stored, r"shard-00001\.safetensors is missing \(or not a plain file\)")
    after = stored.times()
    assert after["shard-00000.safetensors"] == times["shard-00000.safetensors"]
    assert after["shard-00002.safetensors"] == times["shard-00002.safetensors"]


def test_r3_30_an_altered_shard_is_extracted_again_and_the_others_kept(stored):
    """Same rows and image paths, other values: only the recorded SHA-256 tells, and the rebuild drops it."""
    times = stored.times()
    paths = [p for p, _ in stored.dataset.samples[3:6]]
    write_shard(stored.folder / "shard-00001.safetensors", {"cls": torch.zeros(3, 2, 384, dtype=torch.float16),
                "mean": torch.zeros(3, 384, dtype=torch.float16), "labels": torch.zeros(3, dtype=torch.long)}, paths)  # fmt: skip
    rebuilt(stored, r"shard-00001\.safetensors is not the file index\.json recorded")
    after = stored.times()
    assert after["shard-00000.safetensors"] == times["shard-00000.safetensors"] and after["shard-00001.safetensors"] != times["shard-00001.safetensors"]


def test_r3_30_an_index_without_records_is_rebuilt(stored):
    index = stored.index()
    index["shards"] = [record["name"] for record in index["shards"]]  # the index of an earlier version
    stored.write_index(index)
    rebuilt(stored, "index.json records no size and SHA-256 per shard")


def test_r3_13_the_index_records_each_shards_size_and_sha256(stored):
    for record in stored.index()["shards"]:
        data = (stored.folder / record["name"]).read_bytes()
        assert record == {"name": record["name"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- the same faults in a `dinov3ds features --out` folder: one line from the reader, the same command rebuilds


def damage_index(folder: Path, change: Callable[[dict], None]) -> None:
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))


def outside_shard(index: dict) -> None:
    index["shards"][0]["name"] = "../outside.safetensors"


def listed_twice(index: dict) -> None:
    index["shards"][1] = index["shards"][0]


def shard_size_five(index: dict) -> None:
    index["shard_size"] = 5


# (case, the damage, the fault the reader names, the shards the same command writes again: exactly those that
# lost their record or their file)
FOLDER_FAULTS = [
    ("r3-13", lambda f: damage_index(f, outside_shard), r"names shard '\.\./outside\.safetensors', not a plain name", {0}),
    ("r3-14", lambda f: damage_index(f, listed_twice), r"lists shard-00000\.safetensors twice", {1}),
    ("r3-29", lambda f: damage_index(f, shard_size_five), r"says 5 rows in shards of 5, settings\.json 5 in shards of 2", set()),
    ("r3-30", lambda f: (f / "shard-00001.safetensors").unlink(), r"shard-00001\.safetensors is missing", {1}),
]  # fmt: skip


@pytest.mark.parametrize("case, damage, fault, again", FOLDER_FAULTS, ids=[case[0] for case in FOLDER_FAULTS])
def test_a_damaged_features_folder_is_one_line_and_the_same_command_rebuilds_it(case, damage, fault, again, photos,
                                                                                reference, tmp_path):  # fmt: skip
    folder, outside = tmp_path / "feats", tmp_path / "outside.safetensors"
    shutil.copytree(reference, folder)
    outside.write_bytes((folder / "shard-00002.safetensors").read_bytes())
    damage(folder)
    with pytest.raises(UserError, match=rf"{re.escape(str(folder))}: .*{fault}.*; run the same dinov3ds features command again") as error:
        read_features(folder)
    assert "\n" not in str(error.value)
    before = {i: folder.joinpath(f"shard-0000{i}.safetensors").stat().st_mtime_ns for i in range(3) if i not in again}
    assert main(features(photos, folder)) == 0
    assert shard_bytes(folder) == shard_bytes(reference) and outside.read_bytes() == shard_bytes(reference)["shard-00002.safetensors"]
    assert (folder / "index.json").read_text() == (reference / "index.json").read_text()
    assert {i: folder.joinpath(f"shard-0000{i}.safetensors").stat().st_mtime_ns for i in before} == before  # kept
    for name in ("cls", "pooled", "patches", "paths"):
        np.testing.assert_array_equal(read_features(folder)[name], read_features(reference)[name])


def test_r3_19_after_a_full_disk_the_same_command_resumes_from_the_shard_it_wrote(photos, reference, tmp_path, mounts):
    out = tmp_path / "out"
    full_out(tmp_path, photos, mounts)
    assert main(features(photos, out)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["settings.json", "shard-00000.safetensors"]  # no half file, no lock
    written = (out / "shard-00000.safetensors").stat().st_mtime_ns
    subprocess.run(["mount", "-o", "remount,size=1m", str(out)], check=True)
    assert main(features(photos, out)) == 0
    assert shard_bytes(out) == shard_bytes(reference) and (out / "shard-00000.safetensors").stat().st_mtime_ns == written


def test_r3_19_a_cache_on_a_full_disk_trains_without_it_and_leaves_nothing_trusted(probe, tmp_path, mounts, monkeypatch):
    cache = small_disk(tmp_path / "disk", "8k", mounts)
    monkeypatch.setenv("DINOV3DS_CACHE", str(cache))
    with pytest.warns(UserWarning, match="RANDOM"):
        probe = Probe(probe.root)  # its store now goes to the small disk
    with pytest.warns(DataWarning, match=r"cannot be written \(No space left on device\); training without it"):
        probe.assert_fresh(probe.features())
    assert not (probe.folder / "index.json").exists() and not list(probe.folder.glob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=1m", str(cache)], check=True)
    probe.assert_fresh(probe.features())
    assert (probe.folder / "index.json").is_file()


def test_r3_19_a_failed_write_leaves_no_temporary_file_and_never_follows_a_link(tmp_path):
    """publish writes a temporary name with O_NOFOLLOW: a link planted there is refused, not written through."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("the user's")
    path = tmp_path / "index.json"
    (tmp_path / f"index.json.{os.getpid()}.tmp").symlink_to(target)
    with pytest.raises(OSError):
        publish(path, b"{}")
    assert target.read_text() == "the user's" and not path.exists()
    assert list(tmp_path.iterdir()) == [target]
    publish(path, b"{}")
    assert path.read_bytes() == b"{}" and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "index.json"]
