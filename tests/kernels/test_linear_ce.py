"""The chunked linear cross-entropy against autograd through the full-logits reference.

Tolerances: float32 rtol=atol=1e-5 (the same math, summed in another order); float64 1e-10;
bfloat16 rtol 1e-2 and atol 1e-2 of the largest reference element, because the fused path
rounds each chunk's logits and d_logits to bf16 for its GEMMs where the reference keeps the
float32 logits (both return bf16-rounded gradients).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from kernels.linear_ce import CPU_SPACE, TRITON_SPACE, linear_cross_entropy, linear_cross_entropy_reference

# Above the largest chunk in CPU_SPACE and a multiple of none: every chunk size splits the
# tokens and leaves a short last chunk.
N_SPLIT = max(CPU_SPACE["chunk_tokens"]) + 37
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def _inputs(n: int, v: int, h: int, dtype: torch.dtype, *, seed: int, ignored: float = 0.2,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    return hidden, weight, targets.to(device)


def _compare(n: int, v: int, h: int, dtype: torch.dtype, reduction: str, *, seed: int = 0,
             ignored: float = 0.2, device: str = "cpu", **kwargs: object) -> None:
    hidden, weight, targets = _inputs(n, v, h, dtype, seed=seed, ignored=ignored, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref = linear_cross_entropy_reference(hidden, weight, targets, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    if dtype == torch.bfloat16:
        torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0.0)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2 * r.abs().max().item())
        return
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[dtype])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_tokens", CPU_SPACE["chunk_tokens"])
def test_every_cpu_config_matches_reference_float32(chunk_tokens: int, reduction: str) -> None:
    _compare(N_SPLIT, 97, 16, torch.float32, reduction, seed=chunk_tokens, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_tokens", [1, 8, 16, 36, 37, 64])
def test_small_chunks_match_reference_float64(chunk_tokens: int, reduction: str) -> None:
    _compare(37, 97, 16, torch.float64, reduction, seed=chunk_tokens, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_tokens", [8, CPU_SPACE["chunk_tokens"][0]])
def test_bfloat16_matches_reference_within_bf16_tolerance(chunk_tokens: int, reduction: str) -> None:
    _compare(300, 97, 16, torch.bfloat16, reduction, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("chunk_tokens", [1, 1024])
def test_single_token(chunk_tokens: int) -> None:
    _compare(1, 97, 16, torch.float32, "mean", ignored=0.0, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_ignored_is_zero_loss_and_zero_grads(reduction: str) -> None:
    hidden, weight, targets = _inputs(37, 97, 16, torch.float32, seed=3, ignored=1.0)
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_tokens=8)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # Deliberately unlike torch, whose mean over no tokens is nan.
    ref = linear_cross_entropy_reference(hidden, weight, targets, reduction=reduction)
    assert ref.isnan().item() == (reduction == "mean")


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_one_input_frozen(which: str) -> None:
    hidden, weight, targets = _inputs(37, 97, 16, torch.float32, seed=4)
    frozen, live = (hidden, weight) if which == "hidden" else (weight, hidden)
    frozen.requires_grad_(False)
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, chunk_tokens=8), live)
    (ref,) = torch.autograd.grad(linear_cross_entropy_reference(hidden, weight, targets), live)
    torch.testing.assert_close(grad, ref, **TOL[torch.float32])


def test_no_grad_mode_gives_the_loss_alone() -> None:
    hidden, weight, targets = _inputs(37, 97, 16, torch.float32, seed=8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_tokens=8)
        ref = linear_cross_entropy_reference(hidden, weight, targets, reduction="mean")
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])


def test_upstream_gradient_scales_the_stored_grads() -> None:
    hidden, weight, targets = _inputs(37, 97, 16, torch.float64, seed=5)
    w = torch.tensor(-2.5, dtype=torch.float64)
    grads = torch.autograd.grad(w * linear_cross_entropy(hidden, weight, targets, chunk_tokens=8),
                                (hidden, weight))
    ref = torch.autograd.grad(w * linear_cross_entropy_reference(hidden, weight, targets),
                              (hidden, weight))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_peak_memory_is_one_chunk_not_the_full_logits() -> None:
    from profilers.memory import TensorMemoryTracker

    n, v, h, chunk = 512, 1000, 8, 64
    hidden, weight, targets = _inputs(n, v, h, torch.float32, seed=6)
    with TensorMemoryTracker(existing=[hidden, weight, targets]) as mt:
        torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk),
                            (hidden, weight))
    # One float32 chunk of logits, the two gradients, and per-row vectors (a few KiB).
    bound = 4 * (chunk * v + v * h + n * h) + 64 * 1024
    assert mt.peak_bytes - mt.baseline_bytes < bound < 4 * n * v


@pytest.mark.parametrize("chunk", [None, 32, 128, 512])
def test_workspace_count_matches_the_tracked_peak(chunk: int | None) -> None:
    """The tuner's memory cut rests on ``workspace_bytes``: within 2% (plus 64 KiB of per-row
    vectors) of what the tracker sees, for the reference (None) and for fused chunks."""
    from kernels.linear_ce import workspace_bytes
    from profilers.memory import TensorMemoryTracker

    n, v, h = 512, 3000, 16
    hidden, weight, targets = _inputs(n, v, h, torch.float32, seed=7)
    fn = (linear_cross_entropy_reference if chunk is None
          else functools.partial(linear_cross_entropy, chunk_tokens=chunk))
    with TensorMemoryTracker(existing=[hidden, weight, targets]) as mt:
        torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))
    got, want = mt.peak_bytes - mt.baseline_bytes, workspace_bytes(n, h, v, chunk)
    assert abs(got - want) <= 0.02 * want + 64 * 1024, (got, want)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reduction": "avg"}, "reduction='avg'"),
    ({"impl": "cuda"}, "impl='cuda'"),
    ({"chunk_tokens": 0}, "chunk_tokens=0"),
    ({"BLOCK_V": 64}, "are for impl='triton'"),
    ({"impl": "triton", "BLOCK_V": 96}, "BLOCK_V=96 is not a power of two"),
    ({"impl": "triton", "num_warps": 0}, "num_warps=0 is not a power of two"),
])
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    hidden, weight, targets = _inputs(4, 10, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, targets, **kwargs)


def test_target_outside_vocabulary_is_refused() -> None:
    hidden, weight, _ = _inputs(4, 10, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="target 10 is outside the vocabulary of 10"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 10, -100, 3]))


# Triton decorates its own library functions when it is imported, so the interpreter has to
# be chosen before the first import: the interpreted run is a child process, and this one's
# Triton (if a test here uses it on a GPU) stays compiled.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def triton_device() -> str:
    pytest.importorskip("triton")
    if not (_INTERPRET or torch.cuda.is_available()):
        pytest.skip("compiled Triton needs CUDA; the interpreted run is a child process")
    return "cpu" if _INTERPRET else "cuda"


def _triton_config(block_v: int, num_warps: int) -> dict[str, int]:
    return {"BLOCK_V": TRITON_SPACE["BLOCK_V"][block_v], "num_warps": TRITON_SPACE["num_warps"][num_warps]}


# Configs taken from TRITON_SPACE and passed as **config: the knob names are the keywords.
@pytest.mark.parametrize(("v", "config", "reduction"), [
    (1100, _triton_config(0, 0), "sum"),   # 3 blocks, the last partial
    (1100, _triton_config(1, -1), "mean"),  # 2 blocks, the last partial
    (1100, _triton_config(-1, 1), "sum"),  # one partial block
    (97, {"BLOCK_V": 16, "num_warps": 4}, "mean"),  # many small blocks
])
def test_triton_kernel_matches_reference(triton_device: str, v: int, config: dict[str, int],
                                         reduction: str) -> None:
    _compare(13, v, 16, torch.float32, reduction, seed=v, device=triton_device, impl="triton",
             chunk_tokens=8, **config)


def test_triton_kernel_all_ignored(triton_device: str) -> None:
    hidden, weight, targets = _inputs(9, 97, 16, torch.float32, seed=7, ignored=1.0,
                                      device=triton_device)
    loss = linear_cross_entropy(hidden, weight, targets, reduction="mean", impl="triton",
                                chunk_tokens=4, BLOCK_V=32, num_warps=4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_triton_on_cpu_without_the_interpreter_is_refused() -> None:
    if _INTERPRET:
        pytest.skip("the interpreter runs Triton on CPU tensors")
    hidden, weight, targets = _inputs(4, 10, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_cross_entropy(hidden, weight, targets, impl="triton")


def test_interpreted_triton_run_passes(run_interpreted) -> None:  # noqa: ANN001 - fixture
    if _INTERPRET:
        pytest.skip("this is the interpreted run")
    run_interpreted(__file__, "triton_kernel")
