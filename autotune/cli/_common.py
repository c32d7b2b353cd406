"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.config import RunConfig, Workload, load_yaml
from autotune.data import Dataset, Lengths, load_dataset, load_lengths
from autotune.errors import UserError
from autotune.launch import Launch

__all__ = [
    "WORKLOAD_PRESETS", "add_launch_args", "launch_from_args", "load_runconfig", "load_workload",
    "non_negative_int", "positive_float", "positive_int", "print_json",
]

WORKLOAD_PRESETS = {"tiny": Workload}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def load_runconfig(path: str, *, tokens: bool = True) -> tuple[RunConfig, Dataset | Lengths]:
    """A RunConfig from YAML and its data, loaded up front so that data errors surface
    before any work starts; ``tokens=False``: the sequence lengths only (what planning and
    pricing read)."""
    rc = load_yaml(RunConfig, Path(path))
    load = load_dataset if tokens else load_lengths
    try:
        dataset = load(rc.workload.data, rc.workload.model.resolve())
    except UserError as exc:
        raise UserError(f"{path}: workload.data: {exc}") from None
    return rc, dataset


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


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ranks (PyTorch's torchrun underneath)")
    g.add_argument("--nproc", type=positive_int,
                   help="ranks on this node (default: the workload's devices_per_node)")
    g.add_argument("--nnodes", type=positive_int, help="nodes (default: the workload's nodes)")
    g.add_argument("--node-rank", type=non_negative_int, default=0, help="this node's index")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (multi-node)")


def launch_from_args(rc: RunConfig, args: argparse.Namespace) -> Launch:
    """Ranks for this command; every problem is refused before any process starts."""
    return Launch.for_config(rc, nproc=args.nproc, nnodes=args.nnodes,
                             node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))
