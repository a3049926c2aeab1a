"""The configs shipped inside the package (`dinov3ds/configs/*.yaml`): found by name, listed, copied out.

`--config classification_imagenette` (or `configs/classification_imagenette.yaml` outside a clone, where no
such file exists) reads the bundled file, so the quick start works from any folder after `pip install`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dinov3ds.errors import UserError

BUNDLED = Path(__file__).resolve().parents[1] / "configs"


def bundled_configs() -> dict[str, Path]:
    """Name (the file name without .yaml) → path, sorted by name."""
    return {path.stem: path for path in sorted(BUNDLED.glob("*.yaml"))}


def bundled_path(given: str | Path) -> Path | None:
    """The bundled config `given` names: `NAME`, `NAME.yaml` or `configs/NAME.yaml`; None when it names none."""
    path = Path(given)
    if len(path.parts) > 2 or (len(path.parts) == 2 and path.parts[0] != "configs"):
        return None
    return bundled_configs().get(path.name.removesuffix(".yaml"))


def describe(path: Path) -> str:
    """The config's first comment line: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy_config(name: str, destination: str | Path | None = None) -> Path:
    """Write the bundled config `name` to `destination` (a file, or a folder to put NAME.yaml in; default
    ./NAME.yaml) to edit; an existing file is never replaced."""
    source = bundled_path(name)
    if source is None:
        raise UserError(f"no bundled config named {name}; `dinov3ds configs` lists them: "
                        f"{', '.join(bundled_configs())}")  # fmt: skip
    target = Path(destination) if destination is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists; name another destination (dinov3ds configs copy {name} DEST)")
    if not target.parent.is_dir():
        raise UserError(f"folder {target.parent} does not exist; create it or name another destination")
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer)
    return target
