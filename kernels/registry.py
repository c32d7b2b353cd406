"""The tunable kernels, one ``KernelSpec`` each: what the tuner, the tuning cache and the
trainer know of a kernel (its module, shape keys, default config and CPU config space, the
shapes a training step runs, how to make inputs of a shape, one timed call, forward and
backward where the kernel has one, and the features the family ranker learns from).

Shapes are dicts of ints. Attention's shape is a token count and the longest sequence of a
micro-batch; the segments are laid out deterministically from them (as long as possible,
the remainder last), so a shape always names the same work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.space import configs

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["KERNELS", "KernelSpec", "attention_seqlens"]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    family: str  # the cost-model family its op belongs to
    module: str  # whose source hash stamps the tuning cache
    dims: tuple[str, ...]  # the keys of a shape
    # The config used where none is pinned or tuned: middle of the space, sane before tuning.
    default: dict[str, int]
    space: Callable[[], dict[str, list]]
    # (shape, calls) of each op row of ``family`` (``autotune.step_ops.step_op_rows``) that
    # this kernel runs: the shapes a workload's steps ask the tuning cache for.
    shapes: Callable[[pd.DataFrame], Iterator[tuple[dict[str, int], int]]]
    make: Callable[[dict, torch.dtype, torch.Generator], tuple]
    run: Callable[[tuple, dict], None]
    features: Callable[[dict, dict], dict[str, float]]
    # Bytes a config allocates at a shape (None: the unfused reference's), for the kernels
    # whose point is memory; the tuner holds their picks to a memory cut against the reference.
    workspace: Callable[[dict, dict | None, int], float] | None = None

    def configs(self) -> list[dict]:
        return configs(self.space())

    def admissible(self, shape: dict, cfgs: list[dict], *, itemsize: int = 4,
                   min_memory_cut: float = 1.0) -> list[bool]:
        """Per config: does it cut the workspace at least ``min_memory_cut``-fold against
        the reference? Where none does, the configs with the least workspace are admitted,
        so every shape keeps a choice. Kernels without a workspace count admit everything."""
        if self.workspace is None:
            return [True] * len(cfgs)
        ref = self.workspace(shape, None, itemsize)
        need = [self.workspace(shape, c, itemsize) for c in cfgs]
        ok = [ref / n >= min_memory_cut for n in need]
        return ok if any(ok) else [n == min(need) for n in need]


def _columns(dims: tuple[str, ...], *, op: str | None = None
             ) -> Callable[[pd.DataFrame], Iterator[tuple[dict[str, int], int]]]:
    """Shapes read straight off the op rows' columns, of the rows of ``op`` only if given."""
    def shapes(rows: pd.DataFrame) -> Iterator[tuple[dict[str, int], int]]:
        for r in rows.itertuples():
            if op is None or r.op == op:
                yield {d: int(getattr(r, d)) for d in dims}, int(r.count)

    return shapes


def _log2(v: float) -> float:
    return math.log2(max(float(v), 1.0))


def _tiling(shape: dict, cfg: dict, pairs: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Log sizes, padding waste per tiled dimension and in all, tile count: what decides a
    tiled kernel's speed."""
    out = {f"log2_{k}": _log2(v) for k, v in shape.items()}
    out |= {f"log2_{k}": _log2(v) for k, v in cfg.items()}
    pad, tiles = 1.0, 0.0
    for d, b in pairs:
        n = math.ceil(shape[d] / cfg[b])
        out[f"pad_{d}"] = n * cfg[b] / shape[d]
        pad *= out[f"pad_{d}"]
        tiles += _log2(n)
        out[f"log2_{b}_over_{d}"] = _log2(cfg[b]) - _log2(shape[d])
    out["pad"] = pad
    out["log2_tiles"] = tiles
    return out


# ---- matmul ---------------------------------------------------------------------------------

def _matmul_space() -> dict[str, list]:
    from kernels.matmul import CPU_SPACE

    return CPU_SPACE


def _matmul_make(shape: dict, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    a = torch.randn(shape["m"], shape["k"], generator=gen).to(dtype)
    b = torch.randn(shape["k"], shape["n"], generator=gen).to(dtype)
    return a, b


def _matmul_run(inputs: tuple, cfg: dict) -> None:
    from kernels.matmul import matmul_blocked

    matmul_blocked(*inputs, **cfg)


def _matmul_features(shape: dict, cfg: dict) -> dict[str, float]:
    out = _tiling(shape, cfg, (("m", "block_m"), ("n", "block_n"), ("k", "block_k")))
    out["log2_tile_bytes"] = _log2(4 * (cfg["block_m"] * cfg["block_k"] + cfg["block_k"] * cfg["block_n"]
                                       + cfg["block_m"] * cfg["block_n"]))
    return out


# ---- RMSNorm --------------------------------------------------------------------------------

def _rmsnorm_space() -> dict[str, list]:
    from kernels.rmsnorm import CPU_SPACE

    return CPU_SPACE


def _rmsnorm_make(shape: dict, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    x = torch.randn(shape["tokens"], shape["width"], generator=gen).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape["width"], generator=gen)).to(dtype).requires_grad_()
    return x, w, torch.randn(shape["tokens"], shape["width"], generator=gen).to(dtype)


def _rmsnorm_run(inputs: tuple, cfg: dict) -> None:
    from kernels.rmsnorm import rms_norm_fused

    x, w, g = inputs
    rms_norm_fused(x, w, 1e-5, **cfg).backward(g)
    x.grad = w.grad = None


def _rmsnorm_features(shape: dict, cfg: dict) -> dict[str, float]:
    out = _tiling(shape, cfg, (("tokens", "block_rows"),))
    out["log2_block_bytes"] = _log2(4 * cfg["block_rows"] * shape["width"])
    return out


# ---- fused linear cross-entropy -------------------------------------------------------------

def _lce_space() -> dict[str, list]:
    from kernels.linear_ce import CPU_SPACE

    return CPU_SPACE


def _lce_make(shape: dict, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    h = (torch.randn(shape["tokens"], shape["hidden"], generator=gen)).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(shape["vocab"], shape["hidden"], generator=gen)).to(dtype).requires_grad_()
    y = torch.randint(0, shape["vocab"], (shape["tokens"],), generator=gen)
    return h, w, y


def _lce_run(inputs: tuple, cfg: dict) -> None:
    from kernels.linear_ce import linear_cross_entropy

    h, w, y = inputs
    linear_cross_entropy(h, w, y, **cfg).backward()
    h.grad = w.grad = None


def _lce_workspace(shape: dict, cfg: dict | None, itemsize: int) -> float:
    from kernels.linear_ce import workspace_bytes

    return workspace_bytes(shape["tokens"], shape["hidden"], shape["vocab"],
                           None if cfg is None else cfg["chunk_tokens"], itemsize)


def _lce_features(shape: dict, cfg: dict) -> dict[str, float]:
    out = _tiling(shape, cfg, (("tokens", "chunk_tokens"),))
    out["log2_chunk_logits_bytes"] = _log2(4 * min(cfg["chunk_tokens"], shape["tokens"]) * shape["vocab"])
    return out


# ---- attention ------------------------------------------------------------------------------

def attention_seqlens(tokens: int, max_len: int) -> list[int]:
    """Segments as long as ``max_len``, the remainder last."""
    full, rest = divmod(tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])


def _attention_space() -> dict[str, list]:
    from kernels.attention_blocked import CPU_SPACE

    return CPU_SPACE


def _attention_shapes(rows: pd.DataFrame) -> Iterator[tuple[dict[str, int], int]]:
    # The varlen rows only: a prefix row (a chunk over its sequence's earlier keys) takes
    # the config tuned for its bucket, if any, else the default.
    for r in rows.itertuples():
        if r.op == "varlen":
            seqlens = [int(x) for x in r.seqlens]
            yield ({"tokens": sum(seqlens), "max_len": max(seqlens), "heads": int(r.heads),
                    "kv_heads": int(r.kv_heads), "head_dim": int(r.head_dim)}, int(r.count))


def _attention_make(shape: dict, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    t, h, hk, d = shape["tokens"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, k, v = (torch.randn(t, n, d, generator=gen).to(dtype).requires_grad_() for n in (h, hk, hk))
    cu = [0]
    for n in attention_seqlens(t, shape["max_len"]):
        cu.append(cu[-1] + n)
    return q, k, v, cu, torch.randn(t, h, d, generator=gen).to(dtype)


def _attention_run(inputs: tuple, cfg: dict) -> None:
    from kernels.attention_blocked import varlen_attention_blocked

    q, k, v, cu, g = inputs
    varlen_attention_blocked(q, k, v, cu, cu, **cfg).backward(g)
    q.grad = k.grad = v.grad = None


def _attention_features(shape: dict, cfg: dict) -> dict[str, float]:
    seg = {"tokens": shape["max_len"], "max_len": shape["max_len"]}
    out = _tiling(seg, cfg, (("tokens", "block_q"), ("max_len", "block_k")))
    out["log2_tokens_all"] = _log2(shape["tokens"])
    out["log2_heads"] = _log2(shape["heads"])
    out["log2_head_dim"] = _log2(shape["head_dim"])
    out["log2_block_scores"] = _log2(cfg["block_q"] * cfg["block_k"])
    return out


KERNELS: dict[str, KernelSpec] = {
    "matmul": KernelSpec(
        "matmul", "gemm", "kernels.matmul", ("m", "k", "n"),
        default={"block_m": 128, "block_n": 128, "block_k": 128}, space=_matmul_space,
        shapes=_columns(("m", "k", "n")), make=_matmul_make, run=_matmul_run,
        features=_matmul_features),
    "rmsnorm": KernelSpec(
        "rmsnorm", "norm", "kernels.rmsnorm", ("tokens", "width"),
        default={"block_rows": 256}, space=_rmsnorm_space,
        shapes=_columns(("tokens", "width"), op="rms_norm"), make=_rmsnorm_make,
        run=_rmsnorm_run, features=_rmsnorm_features),
    "linear_ce": KernelSpec(
        "linear_ce", "loss", "kernels.linear_ce", ("tokens", "hidden", "vocab"),
        default={"chunk_tokens": 1024}, space=_lce_space,
        shapes=_columns(("tokens", "hidden", "vocab")), make=_lce_make, run=_lce_run,
        features=_lce_features, workspace=_lce_workspace),
    "attention": KernelSpec(
        "attention", "attention", "kernels.attention_blocked",
        ("tokens", "max_len", "heads", "kv_heads", "head_dim"),
        default={"block_q": 64, "block_k": 64}, space=_attention_space,
        shapes=_attention_shapes, make=_attention_make, run=_attention_run,
        features=_attention_features),
}
