"""`dinov3ds features --out folder/`: shards that any number of processes write, resumable after a kill.

What a kill leaves behind is a mix of complete shards, missing shards and a temporary file (each shard is
renamed into place whole); the resume tests build exactly those states and check that the finished folder
is byte for byte the folder an uninterrupted run writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov3ds.cli import main
from dinov3ds.data.feature_shards import read_features, shard_path

COMMON = ["--backbone", "vits16", "--weights", "random", "--image-size", "32", "--batch-size", "2",
          "--workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"sub{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"sub{i % 2}" / f"p{i}.png")
    return folder


def features(photos: Path, out: Path, *extra: str) -> int:
    return main(["features", str(photos), "--out", str(out), *COMMON, "--shard-size", "3", *extra])


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "feats"
    assert features(photos, out) == 0
    return out


def test_shards_hold_what_the_npz_holds(photos, reference, tmp_path) -> None:
    assert main(["features", str(photos), "--out", str(tmp_path / "f.npz"), *COMMON]) == 0
    whole = np.load(tmp_path / "f.npz")
    sharded = read_features(reference)
    assert sorted(shard_bytes(reference)) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert list(sharded["paths"]) == list(whole["paths"]) and len(sharded["paths"]) == 8
    # Shards of 3 run batches of 2 + 1 where the whole file runs 2 + 2: oneDNN's matmul on an AVX-512/AMX Xeon
    # rounds a row differently with the batch around it (last bit, ~6e-8), so rows are compared to float32's
    # precision, not bit for bit; a wrong or shifted row differs by ~1.
    for name in ("cls", "pooled", "patches"):
        assert sharded[name].dtype == whole[name].dtype
        np.testing.assert_allclose(sharded[name], whole[name], rtol=1e-5, atol=1e-6)


def test_two_processes_write_the_same_bytes_as_one(photos, reference, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    command = [sys.executable, "-m", "dinov3ds", "features", str(photos), "--out", str(out), *COMMON,
               "--shard-size", "3", "--devices", "2"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shard_bytes(out) == shard_bytes(reference)
    assert (out / "index.json").read_text() == (reference / "index.json").read_text()


def test_a_killed_run_resumes_from_the_shards_on_disk(photos, reference, tmp_path) -> None:
    out = tmp_path / "killed"
    assert features(photos, out) == 0
    kept = shard_path(out, 0)
    kept_time = kept.stat().st_mtime_ns
    shard_path(out, 1).unlink()  # never written
    truncated = shard_path(out, 2)
    truncated.write_bytes(truncated.read_bytes()[:100])  # a foreign tool's half-written copy
    (out / "shard-00001.safetensors.123.tmp").write_bytes(b"partial")  # the kill hit during a write
    (out / "index.json").unlink()
    with pytest.raises(Exception, match="no index.json"):
        read_features(out)
    assert features(photos, out) == 0
    assert kept.stat().st_mtime_ns == kept_time  # a complete shard is not recomputed
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp"))  # the killed write's leftover is gone
    np.testing.assert_array_equal(read_features(out)["cls"], read_features(reference)["cls"])


def test_a_folder_of_other_features_is_refused_unless_overwritten(photos, tmp_path, capsys) -> None:
    out = tmp_path / "feats"
    assert features(photos, out) == 0
    before = shard_bytes(out)
    assert features(photos, out, "--image-size", "48") == 2
    assert "other settings" in capsys.readouterr().err
    assert shard_bytes(out) == before
    assert features(photos, out, "--image-size", "48", "--overwrite") == 0
    assert read_features(out)["patches"].shape[-1] == 3  # 48 px / 16


def test_a_folder_of_other_files_is_never_written_into(photos, tmp_path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    assert features(photos, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--shard-size", "0"], "--shard-size"),
    (["--devices", "0"], "--devices"),
    (["--devices", "64"], r"--devices 64 asks for 64 CPU processes, but this process may use \d+ cores"),
])  # fmt: skip
def test_bad_sharding_arguments_are_one_line_errors(photos, tmp_path, capsys, extra, message) -> None:
    assert features(photos, tmp_path / "x", *extra) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()  # refused before anything was started or written


def test_devices_need_a_folder(photos, tmp_path, capsys) -> None:
    assert main(["features", str(photos), "--out", str(tmp_path / "f.npz"), *COMMON, "--devices", "2"]) == 2
    assert "folder" in capsys.readouterr().err
