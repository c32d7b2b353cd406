"""Markdown tables every report shares (pandas' own ``to_markdown`` needs an extra package).
Light on purpose: bench reports import it without the tuner's torch."""

from __future__ import annotations

import pandas as pd

__all__ = ["md_table"]


def md_table(df: pd.DataFrame, floatfmt: dict[str, str] | None = None) -> str:
    """``df`` as a markdown table, index first; ``floatfmt`` maps a column to a format spec."""
    floatfmt = floatfmt or {}
    cols = list(df.columns)
    lines = ["| " + " | ".join([df.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx in df.index:
        cells = [str(idx)] + [format(df.at[idx, c], floatfmt.get(c, ""))
                              if pd.notna(df.at[idx, c]) else "-" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
