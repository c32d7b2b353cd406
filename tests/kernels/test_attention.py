"""The fused varlen attention against the plain per-segment reference."""

import numpy as np
import pytest
import torch

from kernels.attention import (
    Segments,
    attention,
    prefix_causal_attention,
    varlen_attention,
    varlen_attention_reference,
)


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


# ---- one micro-batch's Segments: what every implementation derives its layout from ---------

LAYOUTS = [  # (cu_seqlens of the micro-batch, prefix of segment 0)
    ((0, 5, 130, 300, 301, 520), 0),  # a pack: lengths across block edges, a 1-token one
    ((0, 200, 260, 400), 70),  # a ChunkFlow chunk over 70 keys of earlier chunks, then a pack
    ((0, 1000), 300),  # a chunk alone
    ((0, 3, 9), 0),  # smaller than one block
]


def _dense_reference_mask(cu_q: tuple[int, ...], prefix: int) -> torch.Tensor:
    """Who sees whom, written independently: per segment a bottom-right causal block."""
    cu_k = [0, *(c + prefix for c in cu_q[1:])]
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        mask[cu_q[i]:cu_q[i + 1], cu_k[i]:cu_k[i + 1]] = torch.ones(lq, lk, dtype=torch.bool
                                                                      ).tril(lk - lq)
    return mask


@pytest.mark.parametrize(("cu", "prefix"), LAYOUTS)
def test_segments_mask_and_boundaries_match_an_independent_reference(cu, prefix) -> None:  # noqa: ANN001
    seg = Segments(cu, prefix=prefix)
    mod = seg.mask_mod()
    qi = torch.arange(seg.tokens)[:, None]
    kj = torch.arange(seg.tokens + prefix)[None, :]
    assert torch.equal(mod(0, 0, qi, kj), _dense_reference_mask(cu, prefix))
    cu_q, cu_k = seg.device_cu()
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q.tolist() == list(cu) and cu_k.tolist() == [0, *(c + prefix for c in cu[1:])]
    assert seg.max_q == max(b - a for a, b in zip(cu, cu[1:]))
    assert seg.max_k == max(seg.max_q, cu[1] + prefix)


@pytest.mark.parametrize(("cu", "prefix"), LAYOUTS)
@pytest.mark.parametrize("block", [16, 128])
def test_block_tables_equal_torchs_own_block_mask(cu, prefix, block: int) -> None:  # noqa: ANN001
    """The host-built tables against FlexAttention's create_block_mask (which evaluates the
    mask over every pair): same partial and full blocks, so the same attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = Segments(cu, prefix=prefix)
    theirs = create_block_mask(seg.mask_mod(), None, None, seg.tokens, seg.tokens + prefix,
                               device="cpu", BLOCK_SIZE=block)
    ours = seg.block_mask(block)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)


@pytest.mark.parametrize(("cu", "prefix"), LAYOUTS)
def test_flex_compiled_forward_matches_reference(cu, prefix, one_thread) -> None:  # noqa: ANN001
    """FlexAttention's compiled forward on this CPU, over the same Segments the CUDA path
    uses, against plain math (fp32; its backward does not run on CPU in torch 2.13)."""
    torch.manual_seed(len(cu) + prefix)
    seg = Segments(cu, prefix=prefix)
    q = torch.randn(seg.tokens, 4, 16)
    k, v = torch.randn(seg.tokens, 2, 16), torch.randn(seg.tokens, 2, 16)
    kp, vp = torch.randn(prefix, 2, 16), torch.randn(prefix, 2, 16)
    out = attention(q, k, v, seg, impl="flex", prefix_kv=(kp, vp) if prefix else None)
    ref = varlen_attention_reference(q, torch.cat((kp, k)), torch.cat((vp, v)), seg.cu_q, seg.cu_k)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cu", "prefix"), LAYOUTS)
def test_every_cpu_impl_agrees_through_segments(cu, prefix, one_thread) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    seg = Segments(cu, prefix=prefix)
    q = torch.randn(seg.tokens, 4, 8, dtype=torch.float64)
    k, v = torch.randn(seg.tokens, 2, 8, dtype=torch.float64), torch.randn(seg.tokens, 2, 8,
                                                                           dtype=torch.float64)
    kp, vp = torch.randn(prefix, 2, 8, dtype=torch.float64), torch.randn(prefix, 2, 8,
                                                                         dtype=torch.float64)
    ref = varlen_attention_reference(q, torch.cat((kp, k)), torch.cat((vp, v)), seg.cu_q, seg.cu_k)
    for impl in ("sdpa", "eager", "blocked"):
        out = attention(q, k, v, seg, impl=impl, prefix_kv=(kp, vp) if prefix else None)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9, msg=impl)


def test_a_prefix_the_segments_do_not_expect_is_refused() -> None:
    q = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="prefix has 3 rows, the segments say 0"):
        attention(q, q, q, Segments((0, 4)), prefix_kv=(q[:3], q[:3]))


def _saved_bytes(fn) -> int:  # noqa: ANN001
    """Bytes autograd keeps for backward while ``fn`` runs, each tensor counted once."""
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # alive, so that ids stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[id(t)] = t.nbytes
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_varlen_op_keeps_what_flash_attention_keeps_under_fake_tensors() -> None:
    """The FlashAttention custom op runs under FakeTensorMode (no GPU needed) and autograd
    keeps q, k, v, the output, the logsumexp and the boundaries: never the concatenation of
    the key/value prefix with the chunk's keys, which would grow with the sequence."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t, p, h, hk, d = 512, 4096, 8, 2, 64
    with FakeTensorMode():
        seg = Segments((0, 300, t), prefix=p)
        q = torch.empty(t, h, d, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(t, hk, d, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(t, hk, d, dtype=torch.bfloat16, requires_grad=True)
        kp = torch.empty(p, hk, d, dtype=torch.bfloat16, requires_grad=True)
        vp = torch.empty(p, hk, d, dtype=torch.bfloat16, requires_grad=True)
        out: list[torch.Tensor] = []
        saved = _saved_bytes(lambda: out.append(
            attention(q, k, v, seg, impl="varlen", prefix_kv=(kp, vp))))
        assert out[0].shape == q.shape and out[0].dtype == torch.bfloat16
        out[0].sum().backward()
        assert kp.grad is not None and kp.grad.shape == kp.shape and v.grad.shape == v.shape
    qkv_out = 2 * (t * h * d) * 2 + 2 * (t * hk * d) * 2  # q, out; k, v in bf16
    lse, boundaries = h * t * 4, 2 * 3 * 4
    assert saved == qkv_out + lse + boundaries
    assert saved < 2 * p * hk * d * 2  # the prefix alone (k and v) would be more


def test_varlen_refuses_cpu_tensors_in_one_line() -> None:
    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="runs on CUDA only"):
        attention(q, q, q, Segments((0, 4)), impl="varlen")
