"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.config import WORKLOAD_PRESETS, RunConfig, load_workload, load_yaml
from autotune.data import Dataset, Lengths, load_dataset, load_lengths
from autotune.errors import UserError
from autotune.launch import Launch

__all__ = [
    "WORKLOAD_PRESETS", "add_launch_args", "launch_from_args", "load_runconfig", "load_workload",
    "non_negative_int", "positive_float", "positive_int", "print_json",
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
