"""Record types every measurement is stored as: trial status, environment fingerprint, result.

These are the only `profilers` types other packages may depend on (`cost_models` reads them),
so they stay plain data: no hardware access, no torch.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Fingerprint", "Measurement", "Status"]


class Status(str, Enum):
    """How a measured trial ended; anything but COMPLETE carries no timings."""

    COMPLETE = "COMPLETE"
    OOM = "OOM"
    TIMEOUT = "TIMEOUT"
    CRASHED = "CRASHED"
    INVALID = "INVALID"  # the trainer refused the config before its first step


class Fingerprint(BaseModel):
    """The environment a figure was measured in; caches refuse to mix two of them.

    Frozen so that a fingerprint handed to a cache cannot change under its key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_kind: Literal["cpu", "cuda"]
    device_name: str
    device_count: int = Field(ge=0)
    cpu_model: str
    threads: int = Field(ge=1, description="CPUs the process may run on (its affinity), which "
                         "the ranks it starts share; not torch's per-process thread count")
    torch_version: str
    cuda_version: str | None
    driver_version: str | None
    python_version: str
    package_version: str

    def key(self) -> str:
        """Short stable hash: the first 16 hex digits of sha256 over the key-sorted compact JSON.

        Example:
            >>> fp.key()  # doctest: +SKIP
            '3f9a0c1d2e4b5a67'
        """
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class Measurement(BaseModel):
    """One measured trial: its status and, when it completed, its timings and derived metrics.

    Derived metrics name what they divide by: ``mfu_peak_source`` says which peak (measured
    matmul ceiling or datasheet figure) the MFU is relative to and where it came from.
    """

    model_config = ConfigDict(extra="forbid")

    status: Status
    reason: str = ""
    tokens_per_s: float | None = None
    step_time_s: float | None = Field(default=None, description="median of step_times_s")
    step_time_iqr_s: float | None = None
    step_times_s: list[float] = Field(default_factory=list, description="every raw timed sample")
    warmup_steps: int = Field(default=0, ge=0)
    timed_steps: int = Field(default=0, ge=0)
    peak_mem_bytes: int | None = Field(default=None, description="tensor-level peak")
    peak_rss_bytes: int | None = Field(default=None, description="whole trial process tree")
    mfu: float | None = None
    mfu_peak_source: str | None = None
    model_tflops_per_step: float | None = None
    energy_j: float | None = None
    energy_per_token_j: float | None = None
    canary_s: float | None = Field(default=None, description="the canary matmul's time around "
                                   "the timed steps (CPU only)")
    canary_ref_s: float | None = Field(default=None, description="the canary's time at the "
                                       "machine's reference speed")
    extra: dict[str, float | int | str | list[Any] | None] = Field(default_factory=dict)
    fingerprint: Fingerprint | None = None
    log_tail: str = ""

    @model_validator(mode="before")
    @classmethod
    def _canary_out_of_extra(cls, data: Any) -> Any:
        """Records stored before the canary had fields of its own (measurement tables,
        metrics.json files, study attributes) hold it in ``extra``."""
        if not isinstance(data, dict) or not isinstance(data.get("extra"), dict):
            return data
        extra = dict(data["extra"])
        moved = {k: extra.pop(k) for k in ("canary_s", "canary_ref_s") if k in extra}
        return {**moved, **data, "extra": extra} if moved else data

    @property
    def drift(self) -> float:
        """How much slower the machine ran than its reference speed while this was measured:
        a shared host's speed drifts by 10-20% over minutes, so measurements taken at
        different times meet only once scaled to the reference speed by the canary matmul
        timed around them (a step time divided by this, a throughput multiplied). 1.0 where
        no canary was timed (GPUs, failed trials)."""
        if self.canary_s and self.canary_ref_s:
            return self.canary_s / self.canary_ref_s
        return 1.0

    def to_json_dict(self) -> dict[str, Any]:
        """The record as JSON-ready builtins (enums as strings); ``model_validate`` reads it."""
        return self.model_dump(mode="json")
