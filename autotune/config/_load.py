"""``--workload`` as every command reads it: a preset, a Workload YAML or a RunConfig YAML."""

from __future__ import annotations

from pathlib import Path

from autotune.config._runconfig import RunConfig
from autotune.config._workload import Workload
from autotune.config._yaml import load_yaml
from autotune.errors import UserError

WORKLOAD_PRESETS = {"tiny": Workload}


def load_workload(name: str) -> tuple[Workload, RunConfig | None]:
    """What ``--workload`` names, the same for every command: a preset, a Workload YAML, or
    a RunConfig YAML, whose workload it is (the RunConfig comes back too: ``autotune run``
    measures it as the user's own config). A file is a RunConfig when its top level holds a
    key only a RunConfig has and none of a Workload's: a Workload with a stray key is
    refused naming that key, never read as a RunConfig on the default workload."""
    if name in WORKLOAD_PRESETS:
        return WORKLOAD_PRESETS[name](), None
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise UserError(f"--workload {name!r} is neither a file nor a preset "
                        f"({', '.join(WORKLOAD_PRESETS)})")
    keys = set(_top_keys(path)) if path.is_file() else set()
    if keys & (set(RunConfig.model_fields) - set(Workload.model_fields)) \
            and not keys & set(Workload.model_fields):
        rc = load_yaml(RunConfig, path)
        return rc.workload, rc
    return load_yaml(Workload, path), None


def _top_keys(path: Path) -> list[str]:
    """The keys of a YAML mapping's top level; none when it is no mapping (load_yaml then
    names the problem)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError:
        return []
    return [str(k) for k in doc] if isinstance(doc, dict) else []
