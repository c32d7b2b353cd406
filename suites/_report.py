"""What the suites' reports share: markdown tables and the host line."""

from __future__ import annotations

from autotune.markdown import md_table

__all__ = ["host_line", "md_table"]


def host_line() -> str:
    """What the figures were measured on, for a report's first lines: CPU figures say so."""
    from profilers.fingerprint import current_fingerprint

    fp = current_fingerprint("cpu")
    return f"{fp.cpu_model}, {fp.threads} threads, torch {fp.torch_version}"
