"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.config import RunConfig, load_yaml
from autotune.data import Dataset, load_dataset
from autotune.errors import UserError

__all__ = [
    "load_runconfig", "non_negative_int", "positive_float", "positive_int", "print_json",
    "require_single_rank",
]


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


def load_runconfig(path: str) -> tuple[RunConfig, Dataset]:
    """A RunConfig from YAML and its data, loaded up front so that data errors surface
    before any work starts."""
    rc = load_yaml(RunConfig, Path(path))
    try:
        dataset = load_dataset(rc.workload.data, rc.workload.model.resolve())
    except UserError as exc:
        raise UserError(f"{path}: workload.data: {exc}") from None
    return rc, dataset


def require_single_rank(rc: RunConfig, path: str) -> None:
    if rc.parallel.world_size != 1:
        raise UserError(f"{path}: this trainer runs a single rank; dp*tp*pp*cp must be 1, "
                        f"got {rc.parallel.world_size}")


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))
