"""YAML in and out for the config types, with bad input reported as one line per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from autotune.errors import UserError
from profilers.store import atomic_write_text

__all__ = ["dump_yaml", "format_validation_error", "load_yaml", "parse_config", "save_yaml"]

M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError, *, source: str) -> str:
    """One line per problem: ``source: dotted.key: what is wrong (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "missing") and "input" in err:
                msg += f" (got {err['input']!r})"
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, "
                        f"got {type(data).__name__}")
    return data


def _absolutize(data: dict[str, Any], base: Path) -> None:
    """Make the file paths inside a workload relative to the YAML file's folder."""
    wl = data.get("workload", data)
    if not isinstance(wl, dict):
        return
    for section, key in (("model", "hf_config"), ("data", "path")):
        sub = wl.get(section)
        if isinstance(sub, dict) and isinstance(sub.get(key), str):
            p = Path(sub[key]).expanduser()
            sub[key] = str(p if p.is_absolute() else (base / p).resolve())


def parse_config(cls: type[M], data: Any, *, source: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source=source)) from None
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def load_yaml(cls: type[M], path: str | Path) -> M:
    """Load ``cls`` from a YAML file; a Workload file may also wrap its keys in ``workload:``."""
    path = Path(path)
    data = _read_mapping(path)
    _absolutize(data, path.resolve().parent)
    if cls.__name__ == "Workload" and set(data) == {"workload"}:
        data = data["workload"]
    return parse_config(cls, data, source=str(path))


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(model.model_dump(mode="json", exclude_none=True), sort_keys=False)


def save_yaml(model: BaseModel, path: str | Path) -> Path:
    return atomic_write_text(Path(path), dump_yaml(model))
