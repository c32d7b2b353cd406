"""Start-up checks of the Python environment autotune runs in."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from autotune.errors import UserError

__all__ = ["check_kernels_package"]


def check_kernels_package() -> None:
    """Refuse to run when another top-level ``kernels`` package (Hugging Face ships one)
    shadows autotune's own: the trainer would import the wrong kernels."""
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels"
    found = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if found != ours:
        raise UserError(f"the 'kernels' package at {found} shadows autotune's own ({ours}); "
                        f"install autotune into its own virtual environment (make does)")
