"""Run the real `dinov3ds` command (`python -m dinov3ds`) in a subprocess, and a loopback file server.

The environment of every run points `DINOV3DS_CACHE` / `DINOV3DS_CHECKPOINTS` at the test's own folders (by
default the ones `conftest.isolated_environment` put in `os.environ`), runs in a scratch working directory
(the library also looks in `./checkpoints`), and uses one intra-op thread so that several runs can share
the two CI cores and a run's numbers do not depend on how many cores the machine has.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ERROR_PREFIX = "dinov3ds: error:"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def __iter__(self):  # unpacks as (returncode, stdout, stderr)
        return iter((self.returncode, self.stdout, self.stderr))

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"


def cli_env(
    cache: str | Path | None = None, checkpoints: str | Path | None = None, **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    if cache is not None:
        env["DINOV3DS_CACHE"] = str(cache)
    if checkpoints is not None:
        env["DINOV3DS_CHECKPOINTS"] = str(checkpoints)
    for key in ("DINOV3DS_CACHE", "DINOV3DS_CHECKPOINTS"):
        if key not in env:
            raise RuntimeError(f"{key} is not set: pass it, or use the conftest fixture that sets it")
    env.update({
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })  # fmt: skip
    env.update(extra)
    return env


def start_cli(
    args: Sequence[str | Path], *, cwd: str | Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `python -m dinov3ds ARGS` without waiting (stdout/stderr captured as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dinov3ds", *map(str, args)],
        cwd=str(cwd),
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> CliResult:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"dinov3ds {process.args[3:]} ran over {timeout}s\n{stdout[-2000:]}\n{stderr[-2000:]}"
        ) from None
    return CliResult(process.returncode, stdout, stderr)


def run_cli(
    args: Sequence[str | Path], *, cwd: str | Path, env: dict[str, str] | None = None, timeout: float = 300
) -> CliResult:
    """Run `python -m dinov3ds ARGS` to completion; returns (returncode, stdout, stderr)."""
    return finish(start_cli(args, cwd=cwd, env=env), timeout)


def run_cli_parallel(commands: dict[str, Sequence[str | Path]], *, cwd: str | Path, env: dict[str, str] | None = None,
                     timeout: float = 300, max_parallel: int = 4) -> dict[str, CliResult]:  # fmt: skip
    """Run several commands, `max_parallel` at a time: most of a short run is importing torch/timm/lightning,
    which overlaps well with another run's compute (and caps memory at a few interpreters)."""
    results: dict[str, CliResult] = {}
    pending = list(commands.items())
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < max_parallel:
            name, args = pending.pop(0)
            running[name] = start_cli(args, cwd=cwd, env=env)
        name = next(iter(running))  # oldest first; the others keep running meanwhile
        results[name] = finish(running.pop(name), timeout)
    return {name: results[name] for name in commands}


def error_line(result: CliResult) -> str:
    """The user-error contract: exit 2, exactly one `dinov3ds: error:` line (the last), no traceback."""
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, result.describe()
    assert lines[-1] == errors[0], result.describe()
    return errors[0]


@contextmanager
def serve_folder(folder: str | Path) -> Iterator[str]:
    """Serve `folder` over HTTP on 127.0.0.1 (an ephemeral port); yields the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
