"""Markdown for the suites' reports (pandas' own to_markdown needs an extra package)."""

from __future__ import annotations

import pandas as pd

__all__ = ["host_line", "md_table"]


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


def host_line() -> str:
    """What the figures were measured on, for a report's first lines: CPU figures say so."""
    from profilers.fingerprint import current_fingerprint

    fp = current_fingerprint("cpu")
    return f"{fp.cpu_model}, {fp.threads} threads, torch {fp.torch_version}"
