"""Features of op-family measurements, the same for a stored profile row and for a shape the
step model asks about.

Per family: log2 of the dimensions, log2 of FLOPs and bytes moved, arithmetic intensity,
dtype and pass codes, alignment flags (dims divisible by 16 and by 64, which decide whether a
BLAS or tensor-core kernel runs at full rate), and the device's measured ceilings (matmul
rate for the dtype, copy bandwidth) so that one model can later be shared across devices.
Attention adds the sequence mix: how many sequences, the longest, the prefix, and the causal
query-key pairs (the sum of squared lengths, not the square of the sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from profilers.families import FAMILY, _causal_pairs

__all__ = ["FEATURE_VERSION", "Ceilings", "family_features", "feature_names"]

FEATURE_VERSION = 2  # 2: the attention kernel (impl) is a feature

_PASS = {"fwd": 0, "bwd": 1, "step": 2}
_DTYPE = {"fp32": 0, "bf16": 1}
_IMPL = {"sdpa": 0, "eager": 1, "blocked": 2, "triton": 3, "varlen": 4, "flex": 5}


@dataclass(frozen=True)
class Ceilings:
    """What the device reaches: matmul FLOP/s per dtype and copy bandwidth (read + write
    bytes per second). ``source`` says whether they were measured or come from a datasheet
    (planning for hardware that is absent)."""

    flops_per_s: dict[str, float]
    bytes_per_s: float
    source: str = "measured"

    def peak(self, dtypes: pd.Series) -> np.ndarray:
        return dtypes.map(self.flops_per_s).to_numpy(dtype=float)

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> Ceilings:
        """From a profile store's ``ceiling`` table."""
        # A sweep writes this table only when it completes: until then the frame has no columns.
        held = set(table["what"]) if "what" in table else set()
        if not {"matmul", "copy"} <= held:
            raise ValueError("the profile store has no complete ceiling table (matmul and copy); "
                             "run `autotune profile` to the end once")
        mm = table[table.what == "matmul"]
        copy = table[table.what == "copy"]
        return cls(dict(zip(mm.dtype, mm.flops_per_s.astype(float))),
                   float(copy.bytes_per_s.iloc[0]))


def feature_names(family: str) -> list[str]:
    fam = FAMILY[family]
    names = [f"log2_{d}" for d in fam.dims]
    names += ["log2_flops", "log2_bytes", "intensity", "dtype", "pass", "log2_peak_flops",
              "log2_bandwidth"]
    if fam.aligned:
        names += ["align16", "align64"]
    if family == "attention":
        names += ["log2_tokens", "n_seqs", "log2_max_len", "log2_prefix", "log2_pairs", "prefix_op",
                  "impl"]
    return names + [f"op_{op}" for op in fam.ops]


def _log2(x: pd.Series | np.ndarray) -> np.ndarray:
    return np.log2(np.maximum(np.asarray(x, dtype=float), 1.0))


def family_features(family: str, rows: pd.DataFrame, ceilings: Ceilings) -> pd.DataFrame:
    """The feature matrix of ``rows`` (profile rows or shapes to predict, with the case
    columns and ``flops``/``bytes``), columns in ``feature_names(family)`` order."""
    fam = FAMILY[family]
    f = pd.DataFrame(index=rows.index)
    for d in fam.dims:
        f[f"log2_{d}"] = _log2(rows[d])
    f["log2_flops"] = _log2(rows["flops"])
    f["log2_bytes"] = _log2(rows["bytes"])
    f["intensity"] = rows["flops"].to_numpy(float) / np.maximum(rows["bytes"].to_numpy(float), 1.0)
    f["dtype"] = rows["dtype"].map(_DTYPE).to_numpy(float)
    f["pass"] = rows["pass"].map(_PASS).to_numpy(float)
    f["log2_peak_flops"] = _log2(ceilings.peak(rows["dtype"]))
    f["log2_bandwidth"] = np.log2(ceilings.bytes_per_s)
    if fam.aligned:
        dims = rows[list(fam.dims)].to_numpy(dtype=np.int64)
        f["align16"] = (dims % 16 == 0).all(axis=1).astype(float)
        f["align64"] = (dims % 64 == 0).all(axis=1).astype(float)
    if family == "attention":
        seqlens = rows["seqlens"].map(lambda s: [int(x) for x in s])
        prefix = rows["prefix"].fillna(0).astype(int) if "prefix" in rows else pd.Series(0, rows.index)
        f["log2_tokens"] = _log2(seqlens.map(sum))
        f["n_seqs"] = seqlens.map(len).to_numpy(float)
        f["log2_max_len"] = _log2(seqlens.map(max))
        f["log2_prefix"] = _log2(prefix)
        f["log2_pairs"] = _log2([_causal_pairs(s, p) for s, p in zip(seqlens, prefix)])
        f["prefix_op"] = (rows["op"] == "prefix").to_numpy(float)
        impl = rows["impl"] if "impl" in rows else pd.Series("sdpa", rows.index)
        f["impl"] = impl.map(_IMPL).to_numpy(float)
    for op in fam.ops:
        f[f"op_{op}"] = (rows["op"] == op).to_numpy(float)
    return f[feature_names(family)]
