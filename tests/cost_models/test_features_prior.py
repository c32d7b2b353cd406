"""Features and the analytic prior against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cost_models.features import Ceilings, family_features, feature_names
from cost_models.prior import collective_time, roofline_time
from profilers.families import analytic_cost

CEIL = Ceilings({"fp32": 1e11, "bf16": 4e11}, 2e10)


def _rows(cases: list[dict]) -> pd.DataFrame:
    rows = []
    for c in cases:
        flops, nbytes = analytic_cost(c)
        rows.append(c | {"flops": flops, "bytes": nbytes})
    return pd.DataFrame(rows)


def test_gemm_features_and_roofline_by_hand() -> None:
    rows = _rows([{"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32",
                   "m": 512, "k": 256, "n": 768},
                  {"family": "gemm", "op": "linear", "pass": "bwd", "dtype": "bf16",
                   "m": 100, "k": 256, "n": 768}])
    f = family_features("gemm", rows, CEIL)
    assert list(f.columns) == feature_names("gemm")
    flops = 2 * 512 * 768 * 256  # 201,326,592
    nbytes = (512 * 256 + 256 * 768 + 512 * 768) * 4  # 2,883,584
    assert f.log2_m[0] == 9 and f.log2_n[0] == math.log2(768) and f.log2_k[0] == 8
    assert f.log2_flops[0] == pytest.approx(math.log2(flops))
    assert f.intensity[0] == pytest.approx(flops / nbytes)  # 69.8 flops per byte
    assert (f.align16[0], f.align64[0]) == (1.0, 1.0)
    assert (f.align16[1], f.align64[1]) == (0.0, 0.0)  # m = 100
    assert (f.dtype[1], f["pass"][1]) == (1.0, 1.0)
    assert f.log2_peak_flops[1] == pytest.approx(math.log2(4e11))
    t = roofline_time(rows, CEIL)
    assert t[0] == pytest.approx(flops / 1e11)  # compute-bound: 2.01 ms against 0.14 ms
    bwd_flops = 4 * 100 * 768 * 256
    bwd_bytes = (100 * 256 + 256 * 768 + 100 * 768) * 2 * 2
    assert t[1] == pytest.approx(max(bwd_flops / 4e11, bwd_bytes / 2e10))


def test_attention_counts_pairs_not_the_square_of_the_sum() -> None:
    rows = _rows([{"family": "attention", "op": "varlen", "pass": "fwd", "dtype": "fp32",
                   "heads": 4, "kv_heads": 2, "head_dim": 64, "seqlens": [3, 5]},
                  {"family": "attention", "op": "prefix", "pass": "fwd", "dtype": "fp32",
                   "heads": 4, "kv_heads": 2, "head_dim": 64, "seqlens": [4], "prefix": 8}])
    f = family_features("attention", rows, CEIL)
    assert f.log2_pairs[0] == pytest.approx(math.log2(3 * 4 / 2 + 5 * 6 / 2))  # 21, not 36
    assert f.log2_pairs[1] == pytest.approx(math.log2(4 * 5 / 2 + 4 * 8))  # 42
    assert list(f.n_seqs) == [2.0, 1.0] and list(f.prefix_op) == [0.0, 1.0]
    assert f.log2_max_len[0] == pytest.approx(math.log2(5))
    assert rows.flops[0] == 4.0 * 21 * 4 * 64


def test_norm_is_memory_bound_under_the_roofline() -> None:
    rows = _rows([{"family": "norm", "op": "rms_norm", "pass": "fwd", "dtype": "fp32",
                   "tokens": 1024, "width": 192}])
    elems = 1024 * 192
    assert roofline_time(rows, CEIL)[0] == pytest.approx(elems * 4 * 2 / 2e10)
    assert family_features("norm", rows, CEIL).op_rms_norm[0] == 1.0


def test_collective_prior_from_a_fit_table() -> None:
    fits = pd.DataFrame({"collective": ["all_reduce"], "ranks": [2], "alpha_s": [5e-4],
                         "beta_s_per_byte": [1e-9]})
    assert collective_time("all_reduce", np.array([1e6]), fits, 2)[0] == pytest.approx(5e-4 + 1e-3)
    with pytest.raises(ValueError, match="no alpha-beta fit for all_reduce on 4 ranks"):
        collective_time("all_reduce", 1e6, fits, 4)


def test_ceilings_from_a_store_table() -> None:
    table = pd.DataFrame({"what": ["matmul", "copy"], "dtype": ["fp32", None],
                          "flops_per_s": [1.4e11, None], "bytes_per_s": [None, 2.1e10]})
    c = Ceilings.from_table(table)
    assert c.flops_per_s == {"fp32": 1.4e11} and c.bytes_per_s == 2.1e10
    with pytest.raises(ValueError, match="no complete ceiling table"):
        Ceilings.from_table(table.iloc[:1])
    # A store whose sweep never completed has no ceiling parts: the frame has no columns.
    with pytest.raises(ValueError, match="no complete ceiling table"):
        Ceilings.from_table(pd.DataFrame())
