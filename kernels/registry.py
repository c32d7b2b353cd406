"""The tunable kernels as the kernel tuner sees them: the shape keys, the CPU config space,
how to make inputs of a shape, one timed call (forward and backward where the kernel has
one), and the features the family ranker learns from.

Shapes are dicts of ints. Attention's shape is a token count and the longest sequence of a
micro-batch; the segments are laid out deterministically from them (as long as possible,
the remainder last), so a shape always names the same work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.space import configs

__all__ = ["KERNELS", "KernelSpec", "attention_seqlens"]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    family: str  # the cost-model family its op belongs to
    module: str  # whose source hash stamps the tuning cache
    dims: tuple[str, ...]
    space: Callable[[], dict[str, list]]
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
    "matmul": KernelSpec("matmul", "gemm", "kernels.matmul", ("m", "k", "n"), _matmul_space,
                         _matmul_make, _matmul_run, _matmul_features),
    "rmsnorm": KernelSpec("rmsnorm", "norm", "kernels.rmsnorm", ("tokens", "width"),
                          _rmsnorm_space, _rmsnorm_make, _rmsnorm_run, _rmsnorm_features),
    "linear_ce": KernelSpec("linear_ce", "loss", "kernels.linear_ce",
                            ("tokens", "hidden", "vocab"), _lce_space, _lce_make, _lce_run,
                            _lce_features, _lce_workspace),
    "attention": KernelSpec("attention", "attention", "kernels.attention_blocked",
                            ("tokens", "max_len", "heads", "kv_heads", "head_dim"),
                            _attention_space, _attention_make, _attention_run,
                            _attention_features),
}
