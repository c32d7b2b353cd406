"""rms_norm_fused, every CPU config and a seeded covering sample of Triton configs, against autograd
through the reference on fresh random inputs: output, grad x and grad weight.

Tolerances (the reference runs on the same inputs, so only rounding differs), as
``|got - ref| <= atol * max|ref| + rtol * |ref|``:
float32: rtol = atol = 1e-5 (summation order of the row statistics and of grad weight).
bfloat16: rtol = atol = 1.6e-2, about two bfloat16 ulps: the forward rounds as the reference
does, but a different rstd in its last float32 bit can move a rounding by one ulp, and the
reference's backward rounds grad * weight to bfloat16 where this one stays in float32.

Triton kernels run under ``TRITON_INTERPRET=1``, which must be set before Triton is first
imported (its own helpers such as ``tl.zeros`` are compiled at import). This process has
imported it already, so ``test_triton_under_interpreter`` reruns the ``interpreted`` tests
in a child pytest with the variable set.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from kernels.rmsnorm import CPU_SPACE, TRITON_SPACE, rms_norm_fused, rms_norm_reference
from kernels.space import configs, covering_sample

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]
# 4133 rows leave 37 over for every block_rows of CPU_SPACE; 21 rows leave some over for every
# block_rows of TRITON_SPACE above 1 (fewer rows: the interpreter runs each program in Python).
# Neither width is a power of two.
CPU_SHAPES = [(4133, 48), (3, 37, 100), (1, 48)]
TRITON_SHAPES = [(3, 7, 48), (1, 100)]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Every choice of every knob, seeded. The space's block_h choices cover these rows in one
# step; the two extra configs make the kernels loop over H, with a partial last step.
TRITON_CONFIGS = covering_sample(TRITON_SPACE, 4, seed=0) + [
    {"block_h": 16, "block_rows": 2, "num_warps": 4}, {"block_h": 32, "block_rows": 1, "num_warps": 2}]


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_against_reference(shape: tuple[int, ...], dtype: torch.dtype, seed: int, *,
                             weight_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(weight_dtype or dtype).requires_grad_()
    g = torch.randn(shape, generator=gen).to(torch.promote_types(x.dtype, w.dtype))
    out = rms_norm_fused(x, w, EPS, **kwargs)
    got = (out, *torch.autograd.grad(out, (x, w), g))
    ref = rms_norm_reference(x, w, EPS)
    want = (ref, *torch.autograd.grad(ref, (x, w), g))
    for name, a, b in zip(("out", "grad x", "grad weight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = TOL[dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", configs(CPU_SPACE), ids=str)
def test_cpu_config_matches_reference(config: dict[str, int], dtype: torch.dtype,
                                      shape: tuple[int, ...]) -> None:
    _check_against_reference(shape, dtype, seed=len(shape) + shape[-1], impl="torch", **config)


def test_bf16_input_with_fp32_weight() -> None:
    """As under autocast: the output and its gradient are float32, grad x bfloat16."""
    _check_against_reference((3, 37, 100), torch.bfloat16, seed=3, weight_dtype=torch.float32,
                             impl="torch", block_rows=64)


def test_backward_keeps_x_weight_and_rstd_only() -> None:
    """No float32 copy of x survives to the backward: bf16 x, its weight, one float per row."""
    x = torch.randn(3, 37, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(48, dtype=torch.bfloat16, requires_grad=True)
    saved = rms_norm_fused(x, w, EPS, block_rows=64).grad_fn.saved_tensors
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [
        (torch.bfloat16, (3, 37, 48)), (torch.bfloat16, (48,)), (torch.float32, (111,))]
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == w.data_ptr()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"impl": "torch", "block_h": 256}, r"block_h not a knob of impl='torch'"),
    ({"impl": "cuda"}, r"unknown implementation 'cuda'"),
    ({"impl": "torch", "block_rows": 0}, r"block_rows=0 must be a positive integer"),
    ({"impl": "triton", "block_h": 48}, r"block_h=48 must be a power of two"),
])
def test_bad_knobs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rms_norm_fused(torch.ones(2, 48), torch.ones(48), EPS, **kwargs)


def test_weight_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"weight of shape \(40,\) for rows of 48"):
        rms_norm_fused(torch.ones(2, 48), torch.ones(40), EPS)


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs Triton on CPU tensors")
def test_triton_on_cpu_tensors_is_refused_without_the_interpreter() -> None:
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(got cpu\) or TRITON_INTERPRET=1"):
        rms_norm_fused(torch.ones(2, 48), torch.ones(48), EPS, impl="triton")


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_under_interpreter in a child process")
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=str)
def test_interpreted_triton_config_matches_reference(config: dict[str, int], dtype: torch.dtype,
                                                     shape: tuple[int, ...]) -> None:
    pytest.importorskip("triton")
    _check_against_reference(shape, dtype, seed=len(shape) + shape[-1], impl="triton", **config)


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_under_interpreter in a child process")
def test_interpreted_triton_bf16_input_with_fp32_weight() -> None:
    pytest.importorskip("triton")
    _check_against_reference((3, 7, 48), torch.bfloat16, seed=3, weight_dtype=torch.float32,
                             impl="triton", block_h=32, block_rows=4)


@pytest.mark.skipif(INTERPRETING, reason="the interpreted tests run in this process")
def test_triton_under_interpreter(run_interpreted) -> None:  # noqa: ANN001 - fixture
    run_interpreted(__file__, "interpreted")
