"""`--devices` of predict and features against what this machine has, refused before any process starts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dinov3ds.cli import main
from dinov3ds.models.hardware import usable_cores


@pytest.mark.parametrize("count", [0, usable_cores() + 1, 64])
def test_predict_refuses_more_cpu_processes_than_cores(tmp_path, capsys, count):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    np.save(volumes / "not_read.npy", np.zeros(2))  # never opened: the count is checked first
    code = main(["predict", "--checkpoint", str(tmp_path / "no.ckpt"), str(volumes), "--out", str(tmp_path / "p"),
                 "--device", "cpu", "--devices", str(count)])  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert re.search(rf"--devices {count} asks for {count} CPU processes, but this process may use \d+ cores", error)
    assert not (tmp_path / "p").exists()
