"""Shared test fixtures: the reference folder, an isolated cache, and tiny official-format checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# `dtype: auto` at inference follows the CPU (bf16 where native): pinned to float32 for the whole session,
# module-scoped fixtures and subprocesses included, so every CPU gives the same numbers;
# tests/test_inference_dtype.py and tests/test_precision.py lift the pin to test the detection itself.
os.environ["DINOV3DS_CPU_BF16"] = "0"

REFERENCE_DIR = Path(
    os.environ.get("DINOV3DS_REFERENCE_DIR", Path(__file__).parents[2] / "shared" / "fixtures" / "dinov3_reference")
)


def reference_dir() -> Path:
    """The shared reference fixtures, or a skip that says why (a user's clone has no ../shared).

    CI sets DINOV3DS_REQUIRE_REFERENCE=1 so a missing folder fails instead of silently skipping parity.
    """
    if not (REFERENCE_DIR / "index.json").is_file():
        message = f"reference fixtures not found at {REFERENCE_DIR} (set DINOV3DS_REFERENCE_DIR)"
        if os.environ.get("DINOV3DS_REQUIRE_REFERENCE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Keep caches and checkpoint lookups inside the test's temporary folders."""
    monkeypatch.setenv("DINOV3DS_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("DINOV3DS_CHECKPOINTS", str(tmp_path_factory.mktemp("no_checkpoints")))
    # Test tensors are tiny: a second intra-op thread only adds contention (15-30x slower on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(*extra: str, depth: int = 1) -> list[str]:
    """Config overrides for a fast CPU run: seeded random weights, `depth` blocks, 32 px images, no loader
    workers, no progress bar; `extra` overrides follow (and win)."""
    return ["backbone.weights=random", f"backbone.overrides={{depth: {depth}}}", "data.num_workers=0",
            "trainer.progress_bar=false", "data.image_size=32", "depth.train_crop=null", *extra]  # fmt: skip
