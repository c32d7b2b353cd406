"""Fault injection for tests of the failure paths: a trial that crashes, hangs or runs out
of memory on a chosen rank and step must become a recorded status, never a stopped search.

``AUTOTUNE_FAULT="crash:rank=1:step=2"`` (or ``hang:...``, ``oom:...``) in the environment of
a trial arms it; without the variable nothing happens.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["Fault"]

_KINDS = ("crash", "hang", "oom")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get("AUTOTUNE_FAULT")
        if not spec:
            return None
        kind, *fields = spec.split(":")
        values = dict(f.split("=", 1) for f in fields)
        if kind not in _KINDS:
            raise ValueError(f"AUTOTUNE_FAULT kind {kind!r} is not one of {_KINDS}")
        return cls(kind, int(values.get("rank", 0)), int(values.get("step", 1)))

    def maybe_fire(self, *, rank: int, step: int) -> None:
        """Called before every step with the 1-based step number."""
        if rank != self.rank or step != self.step:
            return
        if self.kind == "crash":
            os.abort()
        if self.kind == "oom":
            raise MemoryError("injected out-of-memory fault")
        while True:  # hang
            time.sleep(3600)
