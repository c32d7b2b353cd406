"""Every tunable kernel's KernelSpec holds its facts: a module that imports, a default among
its choices, the shapes a small run's steps ask for, inputs and a timed call that take those
shapes, and a test file of its own. A new kernel proves itself by its registry entry."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from autotune.config import RunConfig, load_yaml
from autotune.kernel_tune import workload_shapes
from kernels.registry import KERNELS, KernelSpec

EXAMPLE = Path(__file__).parents[2] / "examples" / "chunkflow.yaml"


@pytest.fixture(scope="module")
def step_shapes() -> dict[str, list[dict]]:
    return workload_shapes(load_yaml(RunConfig, EXAMPLE), steps=1)


@pytest.fixture(params=sorted(KERNELS))
def spec(request: pytest.FixtureRequest) -> KernelSpec:
    return KERNELS[request.param]


def test_its_module_imports_and_stamps_the_cache(spec: KernelSpec) -> None:
    assert importlib.import_module(spec.module).__file__


def test_its_default_is_one_of_its_choices(spec: KernelSpec) -> None:
    assert spec.default in spec.configs()


def test_a_small_run_asks_for_shapes_it_runs(spec: KernelSpec,
                                             step_shapes: dict[str, list[dict]]) -> None:
    """The shapes read off one step of the example run have the spec's keys, and the
    tuner's inputs, timed call and ranker features take the smallest of them."""
    shapes = step_shapes[spec.name]
    assert shapes and all(tuple(s) == spec.dims for s in shapes)
    assert all(isinstance(v, int) and v > 0 for s in shapes for v in s.values())
    smallest = min(shapes, key=lambda s: math.prod(s.values()))
    spec.run(spec.make(smallest, torch.float32, torch.Generator().manual_seed(0)), spec.default)
    assert all(math.isfinite(v) for v in spec.features(smallest, spec.default).values())


def test_it_has_a_test_file_of_its_own(spec: KernelSpec) -> None:
    own = Path(__file__).with_name(f"test_{spec.module.rsplit('.', 1)[-1]}.py")
    assert own.is_file(), f"{spec.name}: no {own.name} beside this file"
    assert spec.module in own.read_text()
