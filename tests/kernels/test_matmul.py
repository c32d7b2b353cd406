"""matmul_blocked, every CPU config and a seeded covering sample of Triton configs, against
matmul_reference on fresh random inputs whose sizes are not multiples of the blocks.

Tolerances, as ``|got - ref| <= atol * max|ref| + rtol * |ref|``:
float32: rtol = atol = 1e-5 (only the order of the float32 sums differs).
bfloat16: rtol = 2**-7, one bfloat16 ulp, atol = 1e-5: both sum in float32 and round once,
so they can differ only where the two sums straddle a rounding boundary. Summing the K blocks
in bfloat16 would miss this by several ulps.

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

from kernels.matmul import CPU_SPACE, TRITON_SPACE, matmul_blocked, matmul_reference
from kernels.space import configs, covering_sample

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 1e-5)}  # (rtol, atol)
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOL]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# group_m=3 over 8 tile rows: two full groups of the launch order and a partial one.
GROUPED = {"block_m": 16, "block_n": 16, "block_k": 16, "group_m": 3, "num_warps": 4, "num_stages": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _operands(m: int, n: int, k: int, dtype: torch.dtype, *, seed: int, b_transposed: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype).T if b_transposed else \
        torch.randn(k, n, generator=gen).to(dtype)
    return a, b


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    rtol, atol = TOL[ref.dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", configs(CPU_SPACE), ids=str)
def test_cpu_config_matches_reference(config: dict[str, int], dtype: torch.dtype) -> None:
    """Two or more tiles along each of M, N and K, the last one partial, and a single row."""
    m, n, k = config["block_m"] + 37, config["block_n"] + 29, config["block_k"] + 45
    for rows in (m, 1):
        a, b = _operands(rows, n, k, dtype, seed=rows + n + k)
        _assert_matches(matmul_blocked(a, b, impl="torch", **config), matmul_reference(a, b))


def test_cpu_path_differentiates_like_the_reference() -> None:
    a, b = _operands(37, 29, 45, torch.float32, seed=0, b_transposed=True)
    a.requires_grad_()
    b.requires_grad_()
    w = torch.randn(37, 29)
    got = torch.autograd.grad((matmul_blocked(a, b, block_m=16, block_n=8, block_k=16) * w).sum(), (a, b))
    want = torch.autograd.grad((matmul_reference(a, b) * w).sum(), (a, b))
    for g, r in zip(got, want):
        _assert_matches(g, r)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"impl": "torch", "num_warps": 4}, r"num_warps not a knob of impl='torch'"),
    ({"impl": "triton", "block_k": 8}, r"block_k=8 must be a power of two \(>= 16"),
    ({"impl": "triton", "block_m": 48}, r"block_m=48 must be a power of two"),
    ({"impl": "torch", "block_n": -1}, r"block_n=-1 must be a positive integer"),
])
def test_bad_knobs_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        matmul_blocked(torch.ones(4, 3), torch.ones(3, 2), **kwargs)


def test_bad_operands_are_refused() -> None:
    with pytest.raises(ValueError, match=r"cannot multiply \(4, 3\) by \(2, 2\)"):
        matmul_blocked(torch.ones(4, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="dtypes torch.float32 and torch.bfloat16"):
        matmul_blocked(torch.ones(4, 3), torch.ones(3, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="impl='triton' has no backward"):
        matmul_blocked(torch.ones(4, 3, requires_grad=True), torch.ones(3, 2), impl="triton")


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs Triton on CPU tensors")
def test_triton_on_cpu_tensors_is_refused_without_the_interpreter() -> None:
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(got cpu\) or TRITON_INTERPRET=1"):
        matmul_blocked(torch.ones(4, 3), torch.ones(3, 2), impl="triton")


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_under_interpreter in a child process")
@pytest.mark.parametrize("rows", [37, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", covering_sample(TRITON_SPACE, 6, seed=0), ids=str)
def test_interpreted_triton_config_matches_reference(config: dict[str, int], dtype: torch.dtype,
                                                     rows: int) -> None:
    """The single row also reads b through strides: a transposed view."""
    pytest.importorskip("triton")
    a, b = _operands(rows, 29, 45, dtype, seed=rows, b_transposed=rows == 1)
    _assert_matches(matmul_blocked(a, b, impl="triton", **config), matmul_reference(a, b))


@pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_under_interpreter in a child process")
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_triton_grouped_order_covers_every_tile(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    a, b = _operands(16 * 7 + 5, 16 * 2 + 7, 45, dtype, seed=1)
    _assert_matches(matmul_blocked(a, b, impl="triton", **GROUPED), matmul_reference(a, b))


@pytest.mark.skipif(INTERPRETING, reason="the interpreted tests run in this process")
def test_triton_under_interpreter(run_interpreted) -> None:  # noqa: ANN001 - fixture
    run_interpreted(__file__, "interpreted")
