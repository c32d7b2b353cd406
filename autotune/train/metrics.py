"""A training run's metrics: one JSON line per record in ``metrics.jsonl`` and the same
scalars in TensorBoard event files (``tensorboard --logdir DIR``), from rank 0 only.

A resumed run continues both where its checkpoint stands: the JSONL keeps the records up to
the checkpoint's step (a killed run may have logged steps past it, which the resumed run
trains again), and TensorBoard's ``purge_step`` hides the events past it, so each step
appears once in either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from profilers.store import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]

JSONL = "metrics.jsonl"
TB_DIR = "tensorboard"


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The records of ``folder/metrics.jsonl``; a line cut short by a kill is skipped."""
    path = Path(folder) / JSONL
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsLog:
    """Append-only metrics of one run; a no-op where ``folder`` is None or on ranks but 0."""

    def __init__(self, folder: Path | None, *, resume_step: int = 0, enabled: bool = True):
        self.folder = Path(folder) if folder is not None and enabled else None
        self._jsonl: IO[str] | None = None
        self._tb: Any = None
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.folder) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.folder / JSONL, "".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(self.folder / JSONL, "a", encoding="utf-8")  # noqa: SIM115
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.folder / TB_DIR),
                                 purge_step=resume_step + 1 if resume_step else None)

    def write(self, kind: str, step: int, **values: float | int | None) -> None:
        if self._jsonl is None:
            return
        # One write and a flush per record: a kill leaves whole lines, or one cut short.
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{kind}/{name}", v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = None
