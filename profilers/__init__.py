"""How anything is measured: step timers, matmul ceilings, isolated trial runs, records.

The measurement protocol lives here and nowhere else: warm-up discarded, median and IQR of
every raw sample kept, CUDA events read after one synchronize, each figure stamped with the
environment fingerprint it is valid for. Importing the package does not import torch.
"""

from profilers.ceilings import (
    Ceiling,
    CeilingStore,
    datasheet_peak,
    matmul_ceiling,
    measure_matmul_ceiling,
)
from profilers.fingerprint import current_fingerprint
from profilers.isolation import IsolatedRun, run_isolated
from profilers.records import Fingerprint, Measurement, Status
from profilers.store import atomic_write_bytes, atomic_write_text
from profilers.timer import StepTimer, Summary, summarize

__all__ = [
    "Ceiling",
    "CeilingStore",
    "Fingerprint",
    "IsolatedRun",
    "Measurement",
    "Status",
    "StepTimer",
    "Summary",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_fingerprint",
    "datasheet_peak",
    "matmul_ceiling",
    "measure_matmul_ceiling",
    "run_isolated",
    "summarize",
]
