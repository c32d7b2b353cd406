"""The fused varlen attention against the plain per-segment reference."""

import numpy as np
import pytest
import torch

from kernels.attention import prefix_causal_attention, varlen_attention, varlen_attention_reference


def _segments(rng: np.random.Generator, n: int, max_len: int) -> list[int]:
    lengths = rng.integers(1, max_len + 1, size=n)
    lengths[rng.integers(0, n)] = lengths[0]  # at least two segments of one shape
    return [0, *np.cumsum(lengths).tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix", [0, 7])
def test_sdpa_matches_reference_forward_and_backward(seed: int, prefix: int) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cu_q = _segments(rng, 6, 12)
    cu_k = [0, *(c + prefix for c in cu_q[1:])]
    q = torch.randn(cu_q[-1], 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(cu_k[-1], 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(cu_k[-1], 2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cu_q[-1], 4, 8, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu_q, cu_k, impl="sdpa")
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_reference_is_causal_within_a_segment_and_blind_across() -> None:
    """Independent check of the reference itself: hand-built single-head case."""
    cu = [0, 2, 3]
    q = torch.zeros(3, 1, 2, dtype=torch.float64)  # zero queries: uniform weights
    k = torch.zeros(3, 1, 2, dtype=torch.float64)
    v = torch.tensor([[[1.0, 0]], [[3.0, 0]], [[10.0, 0]]], dtype=torch.float64)
    out = varlen_attention_reference(q, k, v, cu, cu)
    # token 0 sees itself; token 1 averages tokens 0 and 1; token 2 starts a new segment.
    assert out[:, 0, 0].tolist() == [1.0, 2.0, 10.0]


def test_bottom_right_alignment_with_prefix() -> None:
    q = torch.zeros(2, 1, 2, dtype=torch.float64)
    k = torch.zeros(5, 1, 2, dtype=torch.float64)
    v = torch.arange(5, dtype=torch.float64).view(5, 1, 1).expand(5, 1, 2).contiguous()
    out = varlen_attention(q, k, v, [0, 2], [0, 5])
    # 3 prefix keys: the first query sees keys 0..3, the last sees all five.
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.5, 2.0], dtype=torch.float64))


def test_unknown_impl_is_refused() -> None:
    q = torch.zeros(2, 1, 2)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'"):
        varlen_attention(q, q, q, [0, 2], [0, 2], impl="nope")


@pytest.mark.parametrize("prefix_len", [1, 9, 40])
def test_prefix_attention_matches_reference(prefix_len: int) -> None:
    """The CPU flash path that keeps only the prefix tensors, against plain math over the
    concatenated keys with bottom-right causal alignment (fp32: flash accumulates in fp32)."""
    torch.manual_seed(prefix_len)
    lq = 11
    q = torch.randn(lq, 6, 16, requires_grad=True)
    kp = torch.randn(prefix_len, 2, 16, requires_grad=True)
    vp = torch.randn(prefix_len, 2, 16, requires_grad=True)
    k = torch.randn(lq, 2, 16, requires_grad=True)
    v = torch.randn(lq, 2, 16, requires_grad=True)
    w = torch.randn(lq, 6, 16)
    inputs = (q, kp, vp, k, v)
    out = prefix_causal_attention(q, kp, vp, k, v)
    grads = torch.autograd.grad((out * w).sum(), inputs)
    ref = varlen_attention_reference(q, torch.cat((kp, k)), torch.cat((vp, v)), [0, lq],
                                     [0, prefix_len + lq])
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
