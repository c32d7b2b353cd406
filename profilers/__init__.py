"""How anything is measured: step timers, hardware ceilings, telemetry, isolated trial runs,
records.

The measurement protocol lives here and nowhere else: warm-up discarded, median and IQR of
every raw sample kept, CUDA events read after one synchronize, each figure stamped with the
environment fingerprint it is valid for. Importing the package does not import torch.
"""

from profilers.ceilings import (
    Accelerator,
    Bandwidth,
    BandwidthStore,
    Ceiling,
    CeilingError,
    CeilingStore,
    copy_bandwidth,
    datasheet,
    datasheet_peak,
    matmul_ceiling,
    measure_copy_bandwidth,
    measure_matmul_ceiling,
)
from profilers.fingerprint import current_fingerprint
from profilers.isolation import IsolatedRun, run_isolated
from profilers.records import Fingerprint, Measurement, Status
from profilers.store import (
    SCHEMA_VERSION,
    ProfileStore,
    StoreError,
    atomic_write_bytes,
    atomic_write_text,
)
from profilers.telemetry import (
    HostProbe,
    NvmlProbe,
    Probe,
    Telemetry,
    TelemetrySummary,
    energy_per_token,
)
from profilers.timer import StepTimer, Summary, summarize

__all__ = [
    "SCHEMA_VERSION",
    "ProfileStore",
    "StoreError",
    "Accelerator",
    "Bandwidth",
    "BandwidthStore",
    "Ceiling",
    "CeilingError",
    "CeilingStore",
    "Fingerprint",
    "HostProbe",
    "IsolatedRun",
    "Measurement",
    "NvmlProbe",
    "Probe",
    "Status",
    "StepTimer",
    "Summary",
    "Telemetry",
    "TelemetrySummary",
    "atomic_write_bytes",
    "atomic_write_text",
    "copy_bandwidth",
    "current_fingerprint",
    "datasheet",
    "datasheet_peak",
    "energy_per_token",
    "matmul_ceiling",
    "measure_copy_bandwidth",
    "measure_matmul_ceiling",
    "run_isolated",
    "summarize",
]
