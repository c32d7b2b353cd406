"""The blocked varlen attention (torch and Triton paths) against the plain reference.

Forward output and dq, dk, dv are compared with ``varlen_attention_reference`` differentiated
by autograd, on fresh random inputs. Tolerances (``torch.testing.assert_close``, per element
|a - b| <= atol + rtol * |b|):

- float32: atol = rtol = 1e-5. Both sides compute in float32; only summation order differs.
- bfloat16: atol = rtol = 2e-2, a few roundings of 8 mantissa bits (~4e-3 each). The
  reference keeps the softmax and the backward in float32 and rounds once at the end; the
  blocked paths also round O before D_i = rowsum(dO * O), and the Triton kernels, like
  FlashAttention, round P and dS to bfloat16 before their matmuls. The worst element seen
  uses about half of this.

The Triton kernels run under ``TRITON_INTERPRET=1`` in a child process: the interpreter is
chosen when a kernel is decorated, so it must be set before the kernel module is imported,
and doing that in the pytest process would also interpret the GPU test below.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels.attention import varlen_attention_reference
from kernels.attention_blocked import CPU_SPACE, TRITON_SPACE, varlen_attention_blocked

ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}

# name -> (cu_seqlens_q, cu_seqlens_k, heads, kv heads). "ragged": a one-token segment and
# lengths that no block size divides, 33 split by blocks of 32 and smaller. "chunkflow": more
# keys than queries in every segment (bottom-right mask). "chunkflow_long": 40 queries over
# 80 keys, split by blocks of 32 and 64, without GQA.
CASES = {
    "ragged": ([0, 1, 7, 40, 41], [0, 1, 7, 40, 41], 4, 2),
    "chunkflow": ([0, 5, 17], [0, 12, 40], 4, 2),
    "chunkflow_long": ([0, 5, 17, 57], [0, 12, 40, 120], 2, 2),
}
HEAD_DIM = 16
# Blocks smaller than any in the space, so every segment is cut into many blocks and the
# partially masked diagonal blocks appear in every shape. The Python loop over block pairs
# makes them the slow configs, hence the short cases only.
TINY = [(4, 4), (4, 8), (8, 4), (3, 5)]
CPU_RUNS = [*itertools.product(CASES, itertools.product(CPU_SPACE["block_q"], CPU_SPACE["block_k"])),
            *itertools.product(("ragged", "chunkflow"), TINY)]


def _inputs(case: str, dtype: torch.dtype, seed: int) -> dict:
    cu_q, cu_k, heads, kv_heads = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rand = lambda n, h: torch.randn(n, h, HEAD_DIM, generator=g).to(dtype)
    return {"q": rand(cu_q[-1], heads), "k": rand(cu_k[-1], kv_heads), "v": rand(cu_k[-1], kv_heads),
            "w": rand(cu_q[-1], heads), "cu_q": cu_q, "cu_k": cu_k}


def _run(fn: Callable[..., torch.Tensor], x: dict) -> list[torch.Tensor]:
    """Output and the gradients of sum(out * w): a random upstream gradient, not all ones."""
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    out = fn(q, k, v, x["cu_q"], x["cu_k"])
    return [out.detach(), *torch.autograd.grad((out * x["w"]).sum(), (q, k, v))]


_REFERENCE: dict[tuple[str, torch.dtype], tuple[dict, list[torch.Tensor]]] = {}


def _case(case: str, dtype: torch.dtype) -> tuple[dict, list[torch.Tensor]]:
    """Inputs and reference results, computed once per case and dtype."""
    if (case, dtype) not in _REFERENCE:
        x = _inputs(case, dtype, seed=2 * list(CASES).index(case) + (dtype == torch.bfloat16))
        _REFERENCE[case, dtype] = x, _run(varlen_attention_reference, x)
    return _REFERENCE[case, dtype]


def _assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], tol: dict) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == w.dtype, name
        def label(message: str, name: str = name) -> str:
            return f"{name}: {message}"

        torch.testing.assert_close(g.float(), w.float(), **tol, msg=label)


@pytest.mark.parametrize(("case", "blocks"), CPU_RUNS, ids=[f"{c}-{q}x{k}" for c, (q, k) in CPU_RUNS])
def test_torch_float32_matches_reference(case: str, blocks: tuple[int, int]) -> None:
    block_q, block_k = blocks
    x, want = _case(case, torch.float32)
    fn = lambda *a: varlen_attention_blocked(*a, block_q=block_q, block_k=block_k)
    _assert_matches(_run(fn, x), want, TOL[torch.float32])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("block_q", "block_k"), [(8, 4), (32, 64), (256, 32)])
def test_torch_bfloat16_matches_reference(case: str, block_q: int, block_k: int) -> None:
    x, want = _case(case, torch.bfloat16)
    fn = lambda *a: varlen_attention_blocked(*a, block_q=block_q, block_k=block_k)
    _assert_matches(_run(fn, x), want, TOL[torch.bfloat16])


def test_block_size_does_not_change_float64_results() -> None:
    """In float64 every blocking must agree to rounding: a skipped or double-counted key
    block would show here far above 1e-12 whatever the reference's own precision."""
    x = {n: t.double() if isinstance(t, torch.Tensor) else t
         for n, t in _inputs("chunkflow_long", torch.float32, seed=7).items()}
    runs = [_run(lambda *a, b=b: varlen_attention_blocked(*a, block_q=b[0], block_k=b[1]), x)
            for b in [(7, 5), (16, 8), (256, 256)]]
    for other in runs[1:]:
        _assert_matches(other, runs[0], {"atol": 1e-12, "rtol": 1e-12})


def test_refuses_bad_arguments() -> None:
    q = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="block_q=0 is not a positive int"):
        varlen_attention_blocked(q, q, q, [0, 4], [0, 4], block_q=0)
    with pytest.raises(ValueError, match="segment 0 has 4 queries but only 2 keys"):
        varlen_attention_blocked(q, q[:2], q[:2], [0, 4], [0, 2])
    with pytest.raises(ValueError, match="block_k=24 must be a power of two >= 16"):
        varlen_attention_blocked(q, q, q, [0, 4], [0, 4], block_k=24, impl="triton")
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        varlen_attention_blocked(q, q, q, [0, 4], [0, 4], impl="cuda")


def test_spaces_are_declarative() -> None:
    for space in (CPU_SPACE, TRITON_SPACE):
        assert all(isinstance(v, list) and v and all(isinstance(c, int) for c in v)
                   for v in space.values())
    assert list(TRITON_SPACE) == ["BLOCK_M", "BLOCK_N", "num_warps", "num_stages"]
    for cfg in TRITON_CONFIGS:  # the interpreted samples are points of the space
        assert all(c in choices for c, choices in zip(cfg, TRITON_SPACE.values())), cfg


# Sampled Triton configs (BLOCK_M, BLOCK_N, num_warps, num_stages): the interpreter runs every
# program in Python, so the whole space would cost minutes. Each block size appears, with
# BLOCK_M equal to, above and below BLOCK_N.
TRITON_CONFIGS = [(16, 16, 4, 1), (32, 16, 4, 2), (16, 64, 4, 1), (64, 32, 4, 2)]
TRITON_RUNS = [
    *((case, torch.float32, cfg) for case in ("ragged", "chunkflow") for cfg in TRITON_CONFIGS),
    *((case, torch.bfloat16, TRITON_CONFIGS[1]) for case in ("ragged", "chunkflow")),
]


def _triton_fn(cfg: tuple[int, int, int, int]) -> Callable[..., torch.Tensor]:
    bm, bn, warps, stages = cfg
    return lambda *a: varlen_attention_blocked(*a, block_q=bm, block_k=bn, impl="triton",
                                               num_warps=warps, num_stages=stages)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> list[list[torch.Tensor]]:
    """Results of every TRITON_RUNS entry, computed by a child process under the interpreter."""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton")
    jobs = [(_case(case, dtype)[0], cfg) for case, dtype, cfg in TRITON_RUNS]
    torch.save(jobs, tmp / "jobs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, __file__, str(tmp / "jobs.pt"), str(tmp / "results.pt")],
                   cwd=ROOT, env=env, check=True, timeout=300)
    return torch.load(tmp / "results.pt")


@pytest.mark.parametrize("index", range(len(TRITON_RUNS)),
                         ids=[f"{c}-{str(d)[6:]}-{'_'.join(map(str, g))}" for c, d, g in TRITON_RUNS])
def test_triton_interpreted_matches_reference(index: int, interpreted: list) -> None:
    case, dtype, _ = TRITON_RUNS[index]
    _assert_matches(interpreted[index], _case(case, dtype)[1], TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [(16, 16, 4, 1), (64, 64, 4, 2), (64, 32, 4, 1)])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_on_gpu_matches_reference(case: str, cfg: tuple, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    x, want = _case(case, dtype)
    x = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in x.items()}
    _assert_matches([t.cpu() for t in _run(_triton_fn(cfg), x)], want, TOL[dtype])


if __name__ == "__main__":  # the interpreted child of the ``interpreted`` fixture
    jobs = torch.load(sys.argv[1])
    torch.save([_run(_triton_fn(cfg), x) for x, cfg in jobs], sys.argv[2])
