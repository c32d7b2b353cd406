"""The analytic prior: what an op should take on this device by the roofline, and a
collective by its latency-bandwidth fit. It is the base margin every learned model corrects,
and the whole prediction where no measurement exists (planning for absent hardware).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cost_models.features import Ceilings

__all__ = ["collective_time", "roofline_time"]


def roofline_time(rows: pd.DataFrame, ceilings: Ceilings) -> np.ndarray:
    """max(FLOPs / matmul rate of the dtype, bytes / copy bandwidth) per row, in seconds.

    The copy bandwidth counts read and write bytes, as ``bytes`` does, so the two meet.
    Elementwise and norm ops reach a fraction of the matmul rate; the roofline's memory
    term is what bounds them, which is why both terms are kept."""
    compute = rows["flops"].to_numpy(float) / ceilings.peak(rows["dtype"])
    memory = rows["bytes"].to_numpy(float) / ceilings.bytes_per_s
    return np.maximum(compute, memory)


def collective_time(collective: str, nbytes: np.ndarray | float, fits: pd.DataFrame,
                    ranks: int) -> np.ndarray:
    """alpha + bytes / bandwidth from a collective fit table (``collective_fit.parquet``)
    for ``ranks`` ranks; raises when the table has no fit for them."""
    fit = fits[(fits.collective == collective) & (fits.ranks == ranks)]
    if fit.empty:
        known = sorted(set(zip(fits.collective, fits.ranks)))
        raise ValueError(f"no alpha-beta fit for {collective} on {ranks} ranks; the profile has "
                         f"{known}")
    alpha, beta = float(fit.alpha_s.iloc[0]), float(fit.beta_s_per_byte.iloc[0])
    return alpha + beta * np.asarray(nbytes, dtype=float)
