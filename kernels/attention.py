"""Variable-length causal attention over ``cu_seqlens``.

Segment ``i`` holds queries ``q[cu_q[i]:cu_q[i+1]]`` and keys/values
``k[cu_k[i]:cu_k[i+1]]``; queries never see another segment. When a segment has more keys
than queries (a ChunkFlow chunk attending to the key/value state of earlier chunks), the
causal mask is aligned bottom-right, as in FlashAttention 2.1+: the last query sees every
key. Grouped-query attention: ``q`` has a multiple of ``k``'s heads.

The trainer describes a micro-batch once, as :class:`Segments` (host boundaries, their one
copy on the device, and whatever an implementation derives from them, built on first use
and reused by every layer), and calls :func:`attention`. Implementations:

- ``sdpa``: torch's fused SDPA, one call per group of equal-shape segments (the CPU default);
- ``eager``: plain math per segment (the reference);
- ``blocked`` / ``triton``: the flash-style blocked kernel of ``kernels.attention_blocked``;
- ``varlen``: FlashAttention varlen (``torch.nn.attention.varlen``'s kernels) on CUDA in
  16-bit, as the ``autotune::varlen_attn`` custom op, whose fake saves what the kernel saves;
- ``flex``: FlexAttention with a document (+ prefix) block mask, compiled.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_IMPLS", "CUDA_ONLY_IMPLS", "Segments", "attention", "block_tables",
    "prefix_causal_attention", "varlen_attention", "varlen_attention_reference",
]

KV = tuple[torch.Tensor, torch.Tensor]
# Implementations that have no CPU kernel: FlashAttention varlen exists only on CUDA, and
# FlexAttention's backward does not run on CPU (its compiled forward does, for tests).
CUDA_ONLY_IMPLS = frozenset({"varlen", "flex"})
FLEX_BLOCK = 128


def _check(q: torch.Tensor, k: torch.Tensor, cu_q: Sequence[int], cu_k: Sequence[int]) -> None:
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q)} entries, cu_seqlens_k {len(cu_k)}")
    if cu_q[-1] != q.shape[0] or cu_k[-1] != k.shape[0]:
        raise ValueError("cu_seqlens must end at the number of rows of q and k")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads {k.shape[1]} do not divide query heads {q.shape[1]}")


@dataclass(eq=False)
class Segments:
    """Where attention may look in one micro-batch: segments laid end to end (``cu_q``),
    segment 0 continuing after ``prefix`` keys of earlier chunks (ChunkFlow's state).

    Everything an implementation needs is derived here, once per micro-batch, and cached
    on the object, so that no layer builds an index, moves a boundary to the device or
    reads one back: the boundaries reach the device once (``cu_q_dev``, given by the caller
    when it moves them with the micro-batch's tokens, else copied here on first use).

    Example:
        >>> s = Segments((0, 3, 7), prefix=2)
        >>> s.cu_k, s.max_q, s.max_k
        ((0, 5, 9), 4, 5)
    """

    cu_q: tuple[int, ...]
    prefix: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cu_q_dev: torch.Tensor | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        cu = tuple(int(c) for c in self.cu_q)
        if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens {cu} must start at 0 and not decrease")
        if self.prefix < 0:
            raise ValueError(f"prefix={self.prefix} is negative")
        self.cu_q = cu

    @property
    def cu_k(self) -> tuple[int, ...]:
        return (0, *(c + self.prefix for c in self.cu_q[1:]))

    @property
    def tokens(self) -> int:
        return self.cu_q[-1]

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:]))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:]))

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def device_cu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cu_q`` and ``cu_k`` as int32 on the device (what FlashAttention takes)."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            cu_q = (self.cu_q_dev if self.cu_q_dev is not None
                    else to_device(np.asarray(self.cu_q, dtype=np.int64), self.device))
            cu_q = cu_q.to(torch.int32)
            if not self.prefix:
                return cu_q, cu_q
            # Every boundary but the first moves by the prefix: no host round trip.
            shift = torch.full_like(cu_q, self.prefix)
            shift[0] = 0
            return cu_q, cu_q + shift
        return self._cached("cu", build)

    def rest(self) -> Segments:
        """Segments 1.. on their own (rows from ``cu_q[1]``), without the prefix."""
        def build() -> Segments:
            s0 = self.cu_q[1]
            return Segments(tuple(c - s0 for c in self.cu_q[1:]), device=self.device)
        return self._cached("rest", build)

    def sdpa_groups(self) -> list[tuple[int, int, torch.Tensor | None, torch.Tensor | None,
                                        torch.Tensor]]:
        """Segments grouped by (query, key) length: per group its lengths, the query and key
        row indices (None for a lone segment, sliced instead) and the output rows; the
        last entry's index is the inverse permutation that restores segment order."""
        return self._cached("sdpa", self._build_sdpa_groups)

    def _build_sdpa_groups(self) -> list:
        cu_q, cu_k = self.cu_q, self.cu_k
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(len(cu_q) - 1):
            groups[(cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i])].append(i)
        out, rows = [], []
        for (lq, lk), members in groups.items():
            sq = np.asarray([cu_q[i] for i in members])
            sk = np.asarray([cu_k[i] for i in members])
            iq = (sq[:, None] + np.arange(lq)).reshape(-1)
            ik = (sk[:, None] + np.arange(lk)).reshape(-1)
            rows.append(iq)
            lone = len(members) == 1
            out.append((lq, lk, None if lone else to_device(iq, self.device),
                        None if lone else to_device(ik, self.device), (int(sq[0]), int(sk[0]))))
        order = np.concatenate(rows)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return out + [to_device(inverse, self.device)]

    def token_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query and per key (keys = prefix, then the micro-batch's own): the segment it
        belongs to and its position on the segment's bottom-right-aligned causal axis, on
        the device. Query ``i`` sees key ``j`` iff same segment and ``kpos[j] <= qpos[i]``."""
        def build() -> tuple[torch.Tensor, ...]:
            q_doc, q_pos, k_doc, k_pos = _token_layout(self.cu_q, self.prefix)
            return tuple(to_device(a, self.device) for a in (q_doc, q_pos, k_doc, k_pos))
        return self._cached("layout", build)

    def mask_mod(self) -> Callable:
        q_doc, q_pos, k_doc, k_pos = self.token_layout()

        def document_causal(b, h, qi, kj):  # noqa: ANN001, ANN202 - FlexAttention's signature
            return (q_doc[qi] == k_doc[kj]) & (k_pos[kj] <= q_pos[qi])
        return document_causal

    def block_mask(self, block: int = FLEX_BLOCK) -> Any:
        """FlexAttention's BlockMask, from block tables computed on the host
        (:func:`block_tables`): torch's ``create_block_mask`` would evaluate the mask over
        every (query, key) pair, quadratic in the micro-batch."""
        def build() -> Any:
            from torch.nn.attention.flex_attention import BlockMask

            tables = block_tables(self.cu_q, self.prefix, block)
            kv_num, kv_idx, full_num, full_idx = (
                to_device(t, self.device)[None, None] for t in tables)
            return BlockMask.from_kv_blocks(
                kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=self.mask_mod(),
                seq_lengths=(self.tokens, self.prefix + self.tokens))
        return self._cached(f"block_mask{block}", build)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` in one copy that does not hold up the host on CUDA
    (pinned, non-blocking); as it is on a CPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


def _token_layout(cu_q: Sequence[int], prefix: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.diff(np.asarray(cu_q, dtype=np.int64))
    n = len(lengths)
    q_doc = np.repeat(np.arange(n, dtype=np.int32), lengths)
    q_pos = np.arange(cu_q[-1], dtype=np.int64) - np.repeat(np.asarray(cu_q[:-1]), lengths)
    q_pos[:lengths[0]] += prefix  # segment 0's queries come after its prefix keys
    k_doc = np.concatenate([np.zeros(prefix, dtype=np.int32), q_doc])
    k_pos = np.concatenate([np.arange(prefix, dtype=np.int64), q_pos])
    return q_doc, q_pos.astype(np.int32), k_doc, k_pos.astype(np.int32)


def block_tables(cu_q: Sequence[int], prefix: int, block: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FlexAttention's sparse block tables for document-causal attention with a prefix on
    segment 0: per query block, how many key blocks it touches partially and which, then
    how many it sees whole (every query sees every key) and which, as int32 arrays of shape
    (q_blocks,) and (q_blocks, kv_blocks).

    The keys a query block sees form one contiguous range (segments are contiguous and
    causal), so only key blocks in that range are listed; a block is full when the whole
    query block and the whole key block lie in one segment and the first query of the
    block already sees the last key of the key block.
    """
    q_doc, q_pos, k_doc, k_pos = _token_layout(cu_q, prefix)
    tq, tk = len(q_doc), len(k_doc)
    nq, nk = -(-tq // block), -(-tk // block)
    k_first = np.asarray([0, *(c + prefix for c in cu_q[1:-1])])  # where segment s's keys start
    kv_num = np.zeros(nq, np.int32)
    full_num = np.zeros(nq, np.int32)
    kv_idx = np.zeros((nq, nk), np.int32)
    full_idx = np.zeros((nq, nk), np.int32)
    for b in range(nq):
        i0, i1 = b * block, min((b + 1) * block, tq) - 1
        lo = int(k_first[q_doc[i0]])
        hi = int(k_first[q_doc[i1]] + q_pos[i1])  # the last query's last visible key
        blocks = np.arange(lo // block, hi // block + 1)
        j0, j1 = blocks * block, np.minimum((blocks + 1) * block, tk) - 1
        full = ((q_doc[i0] == q_doc[i1]) & (i1 - i0 + 1 == block)
                & (k_doc[j0] == q_doc[i0]) & (k_doc[j1] == q_doc[i0])
                & (j1 - j0 + 1 == block) & (k_pos[j1] <= q_pos[i0]))
        part, whole = blocks[~full], blocks[full]
        kv_num[b], full_num[b] = len(part), len(whole)
        kv_idx[b, :len(part)], full_idx[b, :len(whole)] = part, whole
    return kv_num, kv_idx, full_num, full_idx


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int]
                               ) -> torch.Tensor:
    """Plain math, one segment at a time, softmax in at least float32: slow and obviously right."""
    _check(q, k, cu_seqlens_q, cu_seqlens_k)
    rep = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].to(acc).transpose(0, 1)
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].to(acc).repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].to(acc).repeat_interleave(rep, 1).transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(out, 0)


def _sdpa_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """q: (b, lq, H, D), k/v: (b, lk, Hkv, D) -> (b, lq, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if lq == lk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        # A plain boolean mask rather than torch's CausalBias subclass: the CPU kernel
        # materializes the bias anyway, and a tensor subclass breaks dispatch-mode tools
        # such as the memory tracker.
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Segments of equal shape are batched into one fused SDPA call each, so a padded
    micro-batch is a single call and a pack costs one call per distinct length."""
    h, d = q.shape[1:]
    hk = k.shape[1]
    *groups, inverse = seg.sdpa_groups()
    if len(groups) == 1 and not seg.prefix:
        lq, _, _, _, _ = groups[0]
        b = q.shape[0] // lq
        return _sdpa_group(q.view(b, lq, h, d), k.view(b, lq, hk, d),
                           v.view(b, lq, hk, d), lq, lq).reshape(-1, h, d)
    outs = []
    for lq, lk, iq, ik, (q0, k0) in groups:
        if iq is None:
            qs, ks, vs = q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]
        else:
            qs, ks, vs = q.index_select(0, iq), k.index_select(0, ik), v.index_select(0, ik)
        b = qs.shape[0] // lq
        o = _sdpa_group(qs.view(b, lq, h, d), ks.view(b, lk, hk, d), vs.view(b, lk, hk, d), lq, lk)
        outs.append(o.reshape(-1, h, d))
    return torch.cat(outs, 0).index_select(0, inverse)


def _blocked(impl: str) -> Callable[..., torch.Tensor]:
    """The blocked kernel with the block sizes tuned for this micro-batch's shape."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
        from kernels import tuned
        from kernels.attention_blocked import varlen_attention_blocked

        cfg = tuned.config("attention", {"tokens": k.shape[0], "max_len": seg.max_k,
                                         "heads": q.shape[1], "kv_heads": k.shape[1],
                                         "head_dim": q.shape[2]})
        device_cu = seg.device_cu() if impl == "triton" else None
        return varlen_attention_blocked(q, k, v, seg.cu_q, seg.cu_k, impl=impl,
                                        device_cu=device_cu, **cfg)

    return run


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    return varlen_attention_reference(q, k, v, seg.cu_q, seg.cu_k)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments,
            prefix_kv: KV | None = None) -> torch.Tensor:
    from kernels._attention_ops import varlen_attn

    cu_q, cu_k = seg.device_cu()
    kp, vp = prefix_kv if prefix_kv is not None else (None, None)
    return varlen_attn(q, k, v, kp, vp, cu_q, cu_k, seg.max_q, seg.max_k)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments,
          prefix_kv: KV | None = None) -> torch.Tensor:
    from kernels._attention_ops import flex_attention_compiled

    if prefix_kv is not None:
        k, v = torch.cat((prefix_kv[0], k)), torch.cat((prefix_kv[1], v))
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = flex_attention_compiled(q.device.type)(qh, kh, vh, block_mask=seg.block_mask(), enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


# impl -> attention over segments whose keys already include any prefix.
ATTENTION_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa, "eager": _eager, "blocked": _blocked("torch"), "triton": _blocked("triton"),
    "varlen": _varlen, "flex": _flex,
}
# impls that take the prefix themselves, without a concatenated copy for autograd to keep.
_PREFIX_AWARE = {"varlen": _varlen, "flex": _flex}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, *,
              impl: str = "sdpa", prefix_kv: KV | None = None) -> torch.Tensor:
    """Causal attention of a micro-batch within its segments; segment 0 also sees
    ``prefix_kv`` (``seg.prefix`` keys and values of earlier chunks), bottom-right aligned.

    Shapes: q (T, H, D); k, v (T, Hkv, D); prefix keys and values (P, Hkv, D).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"choose from {sorted(ATTENTION_IMPLS)}")
    plen = 0 if prefix_kv is None else prefix_kv[0].shape[0]
    if plen != seg.prefix:
        raise ValueError(f"the key/value prefix has {plen} rows, the segments say {seg.prefix}")
    if prefix_kv is None:
        return ATTENTION_IMPLS[impl](q, k, v, seg)
    kp, vp = prefix_kv[0].to(k.dtype), prefix_kv[1].to(v.dtype)
    if impl in _PREFIX_AWARE:
        return _PREFIX_AWARE[impl](q, k, v, seg, (kp, vp))
    s0 = seg.cu_q[1]
    o = prefix_causal_attention(q[:s0], kp, vp, k[:s0], v[:s0], impl=impl)
    if len(seg.cu_q) == 2:
        return o
    rest = seg.rest()
    return torch.cat((o, ATTENTION_IMPLS[impl](q[s0:], k[s0:], v[s0:], rest)))


def _lower_right_bias(lq: int, lk: int, like: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(lq, lk, dtype=torch.bool, device=like.device).tril(diagonal=lk - lq)
    return torch.zeros(lq, lk, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def _heads_first(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(0, 1).unsqueeze(0) for t in ts]


class _PrefixAttentionCPU(torch.autograd.Function):
    """One segment attending to a key/value prefix plus its own keys, bottom-right causal,
    on the CPU flash kernel.

    What autograd would keep by default is the concatenated keys and values and the float
    mask, per layer: all of them grow with the prefix, i.e. with the longest sequence, which
    is exactly what ChunkFlow must not do. This keeps only the prefix tensors themselves (the
    caller's key/value state, not copies) and rebuilds the concatenation and the mask in
    backward. The prefix is stashed without a version check: ChunkFlow writes each stretch
    of its state once, before any chunk reads it, and never changes it afterwards.
    """

    _fwd = staticmethod(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    _bwd = staticmethod(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)

    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k, v):  # noqa: ANN001
        kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
        bias = _lower_right_bias(q.shape[0], kb.shape[0], q)
        qh, kh, vh = _heads_first(q, kb, vb)
        out, lse = _PrefixAttentionCPU._fwd(qh, kh, vh, 0.0, False, attn_mask=bias)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prefix = (k_prefix, v_prefix)
        return out.squeeze(0).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        k_prefix, v_prefix = ctx.prefix
        kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
        bias = _lower_right_bias(q.shape[0], kb.shape[0], q)
        qh, kh, vh, gh = _heads_first(q, kb, vb, grad_out.contiguous())
        gq, gk, gv = _PrefixAttentionCPU._bwd(gh.contiguous(), qh, kh, vh, out, lse, 0.0, False,
                                              attn_mask=bias)
        gq, gk, gv = (g.squeeze(0).transpose(0, 1) for g in (gq, gk, gv))
        p = k_prefix.shape[0]
        return gq, gk[:p], gv[:p], gk[p:], gv[p:]


def prefix_causal_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, *, impl: str = "sdpa"
                            ) -> torch.Tensor:
    """Attention of one segment's queries over a key/value prefix (earlier chunks of the same
    sequence, all visible) followed by the segment's own keys (causal): bottom-right
    alignment. Shapes: q (L, H, D); k, v (L, Hkv, D); prefixes (P, Hkv, D)."""
    seg = Segments((0, q.shape[0]), prefix=k_prefix.shape[0], device=q.device)
    if impl in _PREFIX_AWARE:
        return _PREFIX_AWARE[impl](q, k, v, seg, (k_prefix, v_prefix))
    if impl == "sdpa" and q.device.type == "cpu" and q.dtype == k_prefix.dtype:
        return _PrefixAttentionCPU.apply(q, k_prefix, v_prefix, k, v)
    kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
    return ATTENTION_IMPLS[impl](q, kb, vb, seg)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int], *,
                     impl: str = "sdpa") -> torch.Tensor:
    """Causal attention within segments given as two boundary lists (segment 0 may have
    more keys than queries: a prefix); see the module docstring for the layout."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"choose from {sorted(ATTENTION_IMPLS)}")
    _check(q, k, cu_seqlens_q, cu_seqlens_k)
    prefix = cu_seqlens_k[1] - cu_seqlens_q[1]
    seg = Segments(tuple(cu_seqlens_q), prefix=prefix, device=q.device)
    if seg.cu_k != tuple(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_k {tuple(cu_seqlens_k)} is not cu_seqlens_q with a prefix on "
                         f"segment 0 only (the layouts the trainer runs)")
    if prefix and impl in _PREFIX_AWARE:
        return _PREFIX_AWARE[impl](q, k[prefix:], v[prefix:], seg, (k[:prefix], v[:prefix]))
    return ATTENTION_IMPLS[impl](q, k, v, seg)
