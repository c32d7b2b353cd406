"""Fault injection for tests of the failure paths: a trial that crashes, hangs or runs out
of memory on a chosen rank and step must become a recorded status, never a stopped search.

``AUTOTUNE_FAULT="crash:rank=1:step=2"`` (or ``hang:...``, ``oom:...``) in the environment of
a trial arms it; without the variable nothing happens. Several faults are separated by
commas, and ``trial=N`` keeps one to the search's trial N (``AUTOTUNE_TRIAL``, which the
search sets for every trial it measures), so one search can meet a different fault in each
trial: ``AUTOTUNE_FAULT="crash:trial=1,hang:trial=3,crash:rank=1:step=2:trial=4"``.
``at=save`` fires while the checkpoint of that step is being written (its shards on disk,
its record not yet), instead of before the step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["Fault"]

_KINDS = ("crash", "hang", "oom")
_PHASES = ("step", "save")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    at: str = "step"

    @classmethod
    def from_env(cls) -> Fault | None:
        """The fault armed for this trial, if any."""
        spec = os.environ.get("AUTOTUNE_FAULT")
        trial = os.environ.get("AUTOTUNE_TRIAL")
        for one in filter(None, (spec or "").split(",")):
            kind, *fields = one.split(":")
            values = dict(f.split("=", 1) for f in fields)
            if (kind not in _KINDS or set(values) - {"rank", "step", "trial", "at"}
                    or values.get("at", "step") not in _PHASES):
                raise ValueError(f"AUTOTUNE_FAULT {one!r}: expected KIND[:rank=R][:step=S]"
                                 f"[:trial=N][:at=save] with KIND one of {_KINDS}")
            if "trial" in values and (trial is None or int(values["trial"]) != int(trial)):
                continue
            return cls(kind, int(values.get("rank", 0)), int(values.get("step", 1)),
                       values.get("at", "step"))
        return None

    def maybe_fire(self, *, rank: int, step: int, phase: str = "step") -> None:
        """Called before every step with the 1-based step number, and while saving a
        checkpoint with ``phase="save"`` and the step it holds."""
        if rank != self.rank or step != self.step or phase != self.at:
            return
        if self.kind == "crash":
            os.abort()
        if self.kind == "oom":
            raise MemoryError("injected out-of-memory fault")
        while True:  # hang
            time.sleep(3600)
