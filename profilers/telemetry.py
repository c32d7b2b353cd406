"""Device and host telemetry sampled in a background thread around timed work.

NVIDIA GPUs are read through NVML (nvidia-ml-py): memory used, utilization, SM clock, power,
and energy from the device's total-energy counter read at start and stop. The host is read
through psutil: RSS and CPU utilization of this process and its children. A metric the
hardware does not report is None, never an error: NVML missing altogether leaves an empty
GPU probe and one log line, and a single unsupported NVML query is dropped for the rest of
the run while the others go on.

Example:
    >>> with Telemetry("cpu", interval_s=0.05) as tel:  # doctest: +SKIP
    ...     train_some_steps()
    >>> tel.summary().rss_peak_bytes  # doctest: +SKIP
    812343296
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "HostProbe",
    "NvmlProbe",
    "Probe",
    "Telemetry",
    "TelemetrySummary",
    "energy_per_token",
]

log = logging.getLogger(__name__)

Value = float | int | None


class Probe(ABC):
    """A source of telemetry, opened when sampling starts and closed when it stops.

    ``read`` returns this instant's value of every name in ``fields`` (None for one the
    source cannot give) and must not raise for a metric the hardware lacks. ``close`` returns
    figures over the whole window, such as an energy counter delta. Telemetry calls a probe
    from one thread at a time.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    available: bool = False  # set by open(): whether any figure will come from this probe

    def open(self) -> None:  # noqa: B027 - optional hook, most probes need no set-up
        """Acquire the source and take any start-of-window reading."""

    @abstractmethod
    def read(self) -> dict[str, Value]:
        """One sample: a value or None for each of ``fields``."""

    def close(self) -> dict[str, Value]:
        """Release the source; whole-window figures keyed by name."""
        return {}


class HostProbe(Probe):
    """RSS and CPU utilization of this process and its children (recursively), via psutil.

    ``cpu_pct`` is the sum of ``psutil.Process.cpu_percent`` over the process tree: percent
    of one core since the previous sample, so two fully busy threads read 200. The first
    sample after ``open`` has no previous one and reads None; a child first seen at a later
    sample counts 0 there (psutil needs two readings of a process to give a rate).
    """

    name = "psutil"
    fields = ("rss_bytes", "cpu_pct")

    def __init__(self) -> None:
        self._root = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        self._first = True

    def open(self) -> None:
        self._procs, self._first, self.available = {}, True, True

    def read(self) -> dict[str, Value]:
        rss, cpu = 0, 0.0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    cpu += proc.cpu_percent(interval=None)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a child that exited (or was never ours to read) since listing
        first, self._first = self._first, False
        return {"rss_bytes": rss, "cpu_pct": None if first else cpu}

    def _tree(self) -> list[psutil.Process]:
        """The live tree, reusing Process handles so that cpu_percent has a previous reading."""
        try:
            current = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            current = [self._root]
        procs: dict[int, psutil.Process] = {}
        for proc in current:
            known = self._procs.get(proc.pid)
            if known is None or not known.is_running():  # new, or a reused pid
                known = proc
                try:
                    known.cpu_percent(interval=None)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            procs[proc.pid] = known
        self._procs = procs  # exited children drop out here
        return list(procs.values())


# Per-sample NVML metrics: name -> reader(pynvml, handle).
_NVML_READERS: dict[str, Callable[[Any, Any], Value]] = {
    "gpu_mem_used_bytes": lambda nv, h: int(nv.nvmlDeviceGetMemoryInfo(h).used),
    "gpu_util_pct": lambda nv, h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
    "sm_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports mW
}
_ENERGY = "energy_counter"


class NvmlProbe(Probe):
    """One NVIDIA GPU through NVML: memory used, utilization, SM clock, power, energy.

    ``energy_j`` is the delta of ``nvmlDeviceGetTotalEnergyConsumption`` (mJ) between open and
    close, and None where the GPU has no such counter (before Volta) or a reading failed.
    The GPU is chosen by UUID when one is given: CUDA and NVML number devices differently
    under ``CUDA_VISIBLE_DEVICES`` or ``CUDA_DEVICE_ORDER``, a UUID is the same in both.

    Args:
        index: NVML device index, used when ``uuid`` is None.
        uuid: NVML UUID ("GPU-..."), as ``torch.cuda.get_device_properties(i).uuid`` gives it
            with the "GPU-" prefix added.
    """

    name = "nvml"
    fields = tuple(_NVML_READERS)

    def __init__(self, index: int = 0, *, uuid: str | None = None) -> None:
        self.index, self.uuid = index, uuid
        self._nv: ModuleType | None = None
        self._handle: Any = None
        self._energy_start: Value = None
        self.unsupported: set[str] = set()
        self._warned: set[str] = set()

    def open(self) -> None:
        self.unsupported, self._warned, self.available = set(), set(), False
        try:
            import pynvml
        except ImportError:
            log.warning("no GPU telemetry: nvidia-ml-py is not installed (pip install nvidia-ml-py)")
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # library not found, driver not loaded, ...
            log.warning("no GPU telemetry: NVML did not initialise (%s)", exc)
            return
        try:
            self._handle = self._device_handle(pynvml)
        except pynvml.NVMLError as exc:
            log.warning("no GPU telemetry: NVML has no device %s (%s)", self._which(), exc)
            _shutdown(pynvml)
            return
        self._nv, self.available = pynvml, True
        self._energy_start = self._call(_ENERGY, pynvml.nvmlDeviceGetTotalEnergyConsumption)

    def read(self) -> dict[str, Value]:
        if self._nv is None:
            return dict.fromkeys(self.fields)
        return {name: self._call(name, partial(reader, self._nv))
                for name, reader in _NVML_READERS.items()}

    def close(self) -> dict[str, Value]:
        if self._nv is None:
            return {"energy_j": None}
        end = self._call(_ENERGY, self._nv.nvmlDeviceGetTotalEnergyConsumption)
        start, self._energy_start = self._energy_start, None
        _shutdown(self._nv)
        self._nv = self._handle = None
        if start is None or end is None:
            return {"energy_j": None}
        return {"energy_j": (end - start) / 1000.0}

    def _device_handle(self, nv: ModuleType) -> Any:
        if self.uuid is not None:
            return nv.nvmlDeviceGetHandleByUUID(self.uuid)
        return nv.nvmlDeviceGetHandleByIndex(self.index)

    def _which(self) -> str:
        return f"uuid={self.uuid}" if self.uuid is not None else f"index={self.index}"

    def _call(self, metric: str, fn: Callable[[Any], Value]) -> Value:
        """``fn(handle)``, or None: a metric NVML does not support is not asked again, any
        other NVML error costs that one reading (and one warning per metric)."""
        nv = self._nv
        assert nv is not None, "NvmlProbe read before a successful open()"
        if metric in self.unsupported:
            return None
        try:
            return fn(self._handle)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED:
                self.unsupported.add(metric)
                log.info("NVML %s is not supported on device %s; recorded as None",
                         metric, self._which())
            elif metric not in self._warned:
                self._warned.add(metric)
                log.warning("NVML %s failed on device %s (%s); that reading is None",
                            metric, self._which(), exc)
            return None


def _shutdown(nv: ModuleType) -> None:
    try:
        nv.nvmlShutdown()
    except nv.NVMLError as exc:
        log.debug("nvmlShutdown failed: %s", exc)  # sampling is over; nothing to recover


@dataclass(frozen=True, slots=True)
class TelemetrySummary:
    """What a Telemetry window saw. Means are over the samples that had a value; a figure no
    sample had is None.

    Attributes:
        samples: number of samples (one at start, one at stop, the rest every interval).
        duration_s: wall time from start to stop.
        gpu_mem_used_peak_bytes: NVML memory used (whole device, every process), peak.
        gpu_util_mean_pct: NVML utilization, percent of time a kernel was running.
        sm_clock_mean_mhz: SM clock.
        power_mean_w: board power.
        energy_j: GPU energy from the NVML total-energy counter delta (whole device, every
            process on it); None without the counter.
        power_integral_j: trapezoidal integral of the power samples over time, an estimate
            that exists where the counter does not; never copied into ``energy_j``.
        cpu_util_mean_pct: process-tree CPU, percent of one core (see HostProbe), each
            sample weighted by the time since the previous one: CPU time over wall time.
        rss_peak_bytes: process-tree RSS, peak over the samples.
        sources: the probes that delivered figures ("psutil", "nvml").
        unsupported: NVML metrics the device refused as not supported.
    """

    samples: int
    duration_s: float
    gpu_mem_used_peak_bytes: int | None
    gpu_util_mean_pct: float | None
    sm_clock_mean_mhz: float | None
    power_mean_w: float | None
    energy_j: float | None
    power_integral_j: float | None
    cpu_util_mean_pct: float | None
    rss_peak_bytes: int | None
    sources: tuple[str, ...]
    unsupported: tuple[str, ...]

    def to_extra(self, prefix: str = "telemetry_") -> dict[str, float | int | str | list[Any] | None]:
        """Flat, JSON-ready figures for ``Measurement.extra``, each key prefixed."""
        out: dict[str, float | int | str | list[Any] | None] = {}
        for key, value in asdict(self).items():
            out[prefix + key] = ",".join(value) if isinstance(value, tuple) else value
        return out


class Telemetry:
    """Samples its probes every ``interval_s`` in a daemon thread while the ``with`` block runs.

    One sample is taken on entry and one on exit, so even a block shorter than the interval
    has two. ``sample_once`` takes one more at any time (tests use it with ``interval_s=None``,
    which starts no thread, for a known number of samples).

    Args:
        device_kind: ``"cpu"`` samples the host; ``"cuda"`` samples the host and one GPU.
        device_index: NVML index of the GPU, when ``device_uuid`` is None.
        device_uuid: NVML UUID of the GPU ("GPU-..."), preferred over the index.
        interval_s: seconds between background samples; None for no background thread.
        clock: the time source, seconds (injectable for tests).
        probes: replace the default probes.
    """

    def __init__(
        self,
        device_kind: str = "cpu",
        *,
        device_index: int = 0,
        device_uuid: str | None = None,
        interval_s: float | None = 0.1,
        clock: Callable[[], float] = time.perf_counter,
        probes: Sequence[Probe] | None = None,
    ) -> None:
        if device_kind not in ("cpu", "cuda"):
            raise ValueError(f"device_kind={device_kind!r} is not one of 'cpu', 'cuda'")
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"interval_s={interval_s} must be positive (or None: no thread)")
        if probes is None:
            probes = [HostProbe()]
            if device_kind == "cuda":
                probes.append(NvmlProbe(device_index, uuid=device_uuid))
        self.probes = list(probes)
        self.interval_s, self._clock = interval_s, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._rows: list[dict[str, Value]] = []
        self._closing: dict[str, Value] = {}
        self._t0: float | None = None
        self._t1: float | None = None

    def __enter__(self) -> Telemetry:
        self._rows, self._closing, self._error, self._t1 = [], {}, None, None
        self._stop.clear()
        for probe in self.probes:
            probe.open()
        self._t0 = self._clock()
        self.sample_once()
        if self.interval_s is not None:
            self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.sample_once()
            self._t1 = self._clock()
        finally:
            for probe in self.probes:
                self._closing |= probe.close()
        if self._error is not None and exc_type is None:
            raise RuntimeError("telemetry sampling thread failed") from self._error

    def _run(self) -> None:
        assert self.interval_s is not None
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception as exc:  # a bug in a probe: reported on exit, not lost in a thread
                self._error = exc
                return

    def sample_once(self) -> dict[str, Value]:
        """Take one sample of every probe now; returns it (with ``t_s`` since start)."""
        if self._t0 is None:
            raise RuntimeError("Telemetry.sample_once() called outside its with block")
        with self._lock:
            row: dict[str, Value] = {"t_s": self._clock() - self._t0}
            for probe in self.probes:
                row |= probe.read()
            self._rows.append(row)
            return dict(row)

    @property
    def samples(self) -> list[dict[str, Value]]:
        """Every raw sample in order, one dict each (``t_s`` plus the probes' fields)."""
        with self._lock:
            return [dict(row) for row in self._rows]

    def frame(self) -> pd.DataFrame:
        """The raw samples as a pandas DataFrame, one row per sample."""
        import pandas as pd

        return pd.DataFrame(self.samples)

    def summary(self) -> TelemetrySummary:
        """Summary of the samples so far; whole-window figures (energy) once the block exited."""
        if self._t0 is None:
            raise RuntimeError("Telemetry.summary() called before the with block started")
        rows = self.samples
        end = self._t1 if self._t1 is not None else self._clock()
        nvml = [p for p in self.probes if isinstance(p, NvmlProbe)]
        unsupported = sorted(metric for p in nvml for metric in p.unsupported)
        energy = self._closing.get("energy_j")
        return TelemetrySummary(
            samples=len(rows),
            duration_s=end - self._t0,
            gpu_mem_used_peak_bytes=_peak(rows, "gpu_mem_used_bytes"),
            gpu_util_mean_pct=_mean(rows, "gpu_util_pct"),
            sm_clock_mean_mhz=_mean(rows, "sm_clock_mhz"),
            power_mean_w=_mean(rows, "power_w"),
            energy_j=float(energy) if energy is not None else None,
            power_integral_j=_integral(rows, "power_w"),
            cpu_util_mean_pct=_time_weighted_mean(rows, "cpu_pct"),
            rss_peak_bytes=_peak(rows, "rss_bytes"),
            sources=tuple(p.name for p in self.probes if p.available),
            unsupported=tuple(unsupported),
        )


def _values(rows: list[dict[str, Value]], key: str) -> list[float | int]:
    return [v for row in rows if (v := row.get(key)) is not None]


def _peak(rows: list[dict[str, Value]], key: str) -> int | None:
    values = _values(rows, key)
    return int(max(values)) if values else None


def _mean(rows: list[dict[str, Value]], key: str) -> float | None:
    values = _values(rows, key)
    return sum(values) / len(values) if values else None


def _t(row: dict[str, Value]) -> float:
    t = row["t_s"]
    assert t is not None  # every row gets its time in sample_once
    return float(t)


def _time_weighted_mean(rows: list[dict[str, Value]], key: str) -> float | None:
    """Mean of a rate whose sample covers the time since the previous sample; a short last
    interval (the exit sample) then counts for little instead of as much as a full one."""
    total = weight = 0.0
    for prev, row in zip(rows, rows[1:]):
        value = row.get(key)
        if value is not None:
            dt = _t(row) - _t(prev)
            total, weight = total + value * dt, weight + dt
    return total / weight if weight > 0 else None


def _integral(rows: list[dict[str, Value]], key: str) -> float | None:
    points = [(_t(row), v) for row in rows if (v := row.get(key)) is not None]
    if len(points) < 2:
        return None
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in zip(points, points[1:]))


def energy_per_token(energy_j: float | None, tokens: float) -> float | None:
    """Joules per token, or None where the energy is unknown.

    Raises:
        ValueError: ``tokens`` is not positive.

    Example:
        >>> energy_per_token(300.0, 1200)
        0.25
    """
    if not tokens > 0:
        raise ValueError(f"tokens={tokens} must be positive")
    return None if energy_j is None else energy_j / tokens
