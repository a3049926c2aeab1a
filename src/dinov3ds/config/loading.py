"""YAML to a `Config`: safe parsing, dotted command-line overrides, one-line errors, saving.

An unknown key or a wrong type is a `UserError` naming the key (and the file or the override that set
it) and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dinov3ds.config.bundled import bundled_path
from dinov3ds.config.schema import Config
from dinov3ds.errors import UserError

MAX_YAML_NODES = 20_000  # a config has hundreds; an alias bomb has millions


def _field_path(loc: tuple) -> list[str]:
    """The config keys in a pydantic error location, without its union-member and list-index parts."""
    path, section = [], Config
    for part in loc:
        fields = section.model_fields if isinstance(section, type) and issubclass(section, BaseModel) else {}
        if part not in fields:
            break
        path.append(str(part))
        section = fields[part].annotation
    return path or [str(loc[0])]


def _describe(error: ValidationError, source: str, overrides: dict[str, str]) -> str:
    """One line for the first config error: where (the file, or the override that set the key), what, what is allowed."""
    first = error.errors()[0]
    extra = first["type"] == "extra_forbidden"
    key = ".".join(str(part) for part in first["loc"]) if extra else ".".join(_field_path(first["loc"]))
    given = next((text for dotted, text in overrides.items() if key == dotted or key.startswith(dotted + ".")), None)
    where = f"override {given}" if given else source
    if extra:
        section: type[BaseModel] = Config
        for part in first["loc"][:-1]:
            field = section.model_fields.get(str(part))
            annotation = getattr(field, "annotation", None)
            section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else section
        allowed = ", ".join(section.model_fields)
        return f"{where}: unknown key '{key}'; allowed here: {allowed}"
    value = repr(first.get("input"))
    value = value if len(value) <= 60 else value[:57] + "..."
    return f"{where}: '{key}': {first['msg']} (got {value}); fix the value"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``key.sub=value`` pairs; values are YAML scalars/lists (``trainer.devices=[0,1]``)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.sub=value, e.g. trainer.max_epochs=5")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _safe_yaml(raw, f"override {item}") if raw else None)
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes after alias expansion, without expanding: an alias counts as often as it is used."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a recursive alias counts as one node here; safe_load refuses it anyway
        children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
        pairs = [item for pair in children for item in pair] if isinstance(node, yaml.MappingNode) else children
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in pairs)
    return memo[id(node)]


def _safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_NODES (a "billion laughs")."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserError(f"{source}: expands to more than {MAX_YAML_NODES} values through YAML aliases; "
                            "write the config without alias chains")  # fmt: skip
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{source} is not valid YAML: {problem}{where}") from None


def config_from_dict(tree: dict, source: str = "config", overrides: list[str] | None = None) -> Config:
    """Validate a config tree; an error names the override that set the key, else `source`."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides or [] if "=" in item}
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise UserError(_describe(error, source, given)) from None


def with_overrides(tree: dict, overrides: list[str] | None, source: str = "config") -> Config:
    """A config tree (e.g. a checkpoint's) with dotted overrides on top, validated."""
    return config_from_dict(_merge(tree, parse_overrides(overrides or [])), source, overrides)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (safe_load only), apply dotted overrides, validate."""
    tree: dict = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            path = bundled_path(path) or path  # a bundled config's name (dinov3ds configs lists them)
        if not path.is_file():
            raise UserError(f"config file {path} not found; `dinov3ds configs` lists the bundled ones")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a UTF-8 text file; pass a YAML config (see configs/)") from None
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror or error}") from None
        tree = _safe_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise UserError(f"{path} must hold a mapping of sections (backbone:, data:, ...)")
    return with_overrides(tree, overrides, source)


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
