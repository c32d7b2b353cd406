"""The step model's compute part: family predictions summed over a step's op rows.

Rows come from ``autotune.step_ops.step_op_rows`` (one rank, one step: every op shape with
how often it runs); each family's model (or the prior where none was fitted) predicts one run
of each shape, and the breakdown is count x prediction summed per family.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from cost_models.family import FamilyModel
from cost_models.features import Ceilings
from cost_models.prior import roofline_time

__all__ = ["compute_breakdown"]


def compute_breakdown(rows: Mapping[str, pd.DataFrame], ceilings: Ceilings,
                      models: Mapping[str, FamilyModel] | None = None) -> dict[str, float]:
    """Seconds per family for one step; families without a model use the prior."""
    out: dict[str, float] = {}
    for family, frame in rows.items():
        model = (models or {}).get(family)
        each = model.predict(frame, ceilings) if model is not None else roofline_time(frame, ceilings)
        out[family] = float((each * frame["count"].to_numpy(float)).sum())
    return out
