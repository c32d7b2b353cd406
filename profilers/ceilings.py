"""Hardware ceilings: the matmul FLOP/s and the memory copy bandwidth this machine really
reaches, each measured once per fingerprint and stored; and the datasheet figures of common
accelerators, for MFU and bandwidth utilization against the vendor's numbers.

A CPU's figures are measured in the calling process. A GPU's are measured by a child process
(``python -m profilers.ceilings``) that stores them, and the caller reads the stored figure:
the ``autotune`` process must not open a CUDA context, which would hold memory on GPU 0 for
the whole run and leave rank 0 less than its peers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from profilers.fingerprint import current_fingerprint, threads_tag
from profilers.records import Fingerprint, Status
from profilers.store import atomic_write_text
from profilers.timer import StepTimer, summarize

if TYPE_CHECKING:
    import torch

__all__ = [
    "Accelerator",
    "Bandwidth",
    "BandwidthStore",
    "Ceiling",
    "CeilingError",
    "CeilingStore",
    "copy_bandwidth",
    "datasheet",
    "datasheet_names",
    "datasheet_peak",
    "matmul_ceiling",
    "measure_copy_bandwidth",
    "measure_matmul_ceiling",
]

Dtype = Literal["fp32", "bf16"]
_DTYPES: tuple[str, ...] = ("fp32", "bf16")
_DEFAULT_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}
# Copy buffers larger than the last-level cache (tens to a few hundred MiB on server CPUs,
# 40-60 MiB of L2 on data-centre GPUs), so the copy streams from and to device memory. CPUs
# with stacked cache (AMD X3D parts, up to ~1 GiB of L3 per socket pair) need size_bytes.
_DEFAULT_COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
# Discarded runs: cuBLAS builds its handle and picks its kernel on the first calls; a CPU BLAS
# only needs one run to fault in the operands and spin up its thread pool.
_WARMUP_RUNS = {"cpu": 1, "cuda": 2}
# Runs per timed batch: a median needs at least three, and on CUDA each batch ends with one
# synchronize so that wall-clock progress reflects work done rather than work queued.
_BATCH_RUNS = 3
# A GPU's ceiling child: CUDA start-up, cuBLAS autotuning and a few seconds of timed runs.
_CHILD_TIMEOUT_S = 600.0


class CeilingError(RuntimeError):
    """A ceiling or bandwidth is not to be had: a GPU's child process failed to measure it, or
    the cache file holding them is not valid. The message is one line that says what to do."""


class Ceiling(BaseModel):
    """A measured matmul ceiling: the best median FLOP/s over the sizes tried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Dtype
    device_kind: Literal["cpu", "cuda"]
    flops_per_s: float = Field(gt=0)
    size: int = Field(gt=0, description="the n of the n x n x n matmul that gave the best")
    samples_s: list[float] = Field(min_length=1, description="every timed run at that size")
    method: str
    fingerprint_key: str
    threads: int | None = Field(default=None, ge=1, description="torch threads of the measuring "
                                "process on a CPU, whose speed depends on them; None on a GPU")


def measure_matmul_ceiling(
    dtype: Dtype,
    device_kind: Literal["cpu", "cuda"] = "cpu",
    *,
    sizes: tuple[int, ...] | None = None,
    min_time_s: float = 0.15,
    max_run_s: float = 5.0,
    windows_n: int = 3,
) -> Ceiling:
    """Measure the dense matmul FLOP/s this device reaches in ``dtype``.

    For each square size n (ascending): warm-up runs are discarded, timed runs repeat until
    ``min_time_s`` of wall time, and the median run gives 2 n^3 / median FLOP/s. The ceiling is
    the best of these. A size whose run is predicted (from the previous size, scaled by n^3)
    to take longer than ``max_run_s`` is skipped: CPUs without bf16 units emulate bf16 matmul
    at ~1 GFLOP/s and would otherwise spend minutes on it. The sizes are timed in
    ``windows_n`` windows and the fastest window kept (one, where a single run already takes
    over a second); on a CPU, a window in which other processes used more than a fifth of
    the machine is measured again.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``. On CUDA, fp32 runs under torch's current float32 matmul
            precision (TF32 or not), which ``method`` records.
        device_kind: ``"cpu"`` or ``"cuda"`` (device 0).
        sizes: matrix sizes to try; default (1024, 2048) on CPU, (4096, 8192) on CUDA.
        min_time_s: timed wall time per size and window.
        max_run_s: longest predicted single run of a size still tried.
        windows_n: independent windows over the sizes.

    Returns:
        The Ceiling, keyed by the current fingerprint (and, on a CPU, the thread count).
    """
    import torch

    _check_dtype(dtype)
    fp = current_fingerprint(device_kind)  # first: it refuses an unknown or absent device
    sizes = tuple(sorted(sizes or _DEFAULT_SIZES[device_kind]))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    device_ctx: AbstractContextManager[object] = (
        torch.cuda.device(0) if device_kind == "cuda" else nullcontext()
    )
    windows = []
    with device_ctx:
        for _ in range(windows_n):
            windows.append(_window(sizes, torch_dtype, device_kind, min_time_s, max_run_s))
            if min(summarize(v).median for v in windows[0][0].values()) > _LONG_RUN_S:
                break  # runs this long average the machine's moments out by themselves
    # the best window: the machine's speed when nothing else held it back
    results, foreign = max(windows, key=lambda w: _rate(w[0], _best_size(w[0])))
    best = _best_size(results)
    samples = results[best]
    return Ceiling(
        dtype=dtype,
        device_kind=device_kind,
        flops_per_s=_rate(results, best),
        size=best,
        samples_s=samples,
        method=_describe(dtype, device_kind, best, len(samples), sizes, list(results))
        + f"; best of {windows_n} windows"
        + (f" (other processes used {foreign:.0%} of the CPU in it)" if foreign is not None else ""),
        fingerprint_key=fp.key(),
        threads=_cpu_threads(device_kind),
    )


_LONG_RUN_S = 1.0


def _rate(results: dict[int, list[float]], n: int) -> float:
    return _flops(n) / summarize(results[n]).median


def _best_size(results: dict[int, list[float]]) -> int:
    return max(results, key=lambda n: _rate(results, n))


def _window(sizes: tuple[int, ...], torch_dtype: Any, device_kind: str, min_time_s: float,
            max_run_s: float, *, max_foreign_cpu: float = 0.2, attempts: int = 3
            ) -> tuple[dict[int, list[float]], float | None]:
    """One window over the sizes; on a CPU, one in which other processes used more than
    ``max_foreign_cpu`` of the machine is measured again (``attempts`` in all), keeping the
    least disturbed, as the profiler does for its cases."""
    from profilers.ops import _ForeignCPU

    best: tuple[dict[int, list[float]], float | None] | None = None
    for _ in range(attempts if device_kind == "cpu" else 1):
        results: dict[int, list[float]] = {}
        ctx: Any = _ForeignCPU() if device_kind == "cpu" else nullcontext()
        with ctx as foreign:
            for n in sizes:
                if results and _predicted_run_s(results, n) > max_run_s:
                    break
                results[n] = _time_size(n, torch_dtype, device_kind, min_time_s)
        share = foreign.fraction if device_kind == "cpu" else None
        if best is None or (share is not None and share < best[1]):
            best = (results, share)
        if share is None or share <= max_foreign_cpu:
            break
        time.sleep(1.0)
    assert best is not None
    return best


def remeasure_if_outrun(ceiling: Ceiling, achieved_flops_per_s: float, *,
                        cache_dir: Path | None = None) -> Ceiling:
    """A measured step that ran faster than the ceiling says the ceiling was measured while
    the machine was slow: measure it again (CPU, in this process) and keep the higher. The
    result may still sit below ``achieved_flops_per_s``; callers then withhold the MFU."""
    if achieved_flops_per_s <= ceiling.flops_per_s or ceiling.device_kind != "cpu":
        return ceiling
    again = measure_matmul_ceiling(ceiling.dtype, "cpu")
    if again.flops_per_s <= ceiling.flops_per_s:
        return ceiling
    root = cache_dir if cache_dir is not None else _default_cache_dir()
    CeilingStore(root).put(again)
    return again


def _cpu_threads(device_kind: str) -> int | None:
    """torch's thread count where it sets the speed (a CPU), None on a GPU."""
    import torch

    return torch.get_num_threads() if device_kind == "cpu" else None


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")


def _flops(n: int) -> float:
    return 2.0 * n**3


def _predicted_run_s(results: dict[int, list[float]], n: int) -> float:
    prev = max(results)
    return summarize(results[prev]).median * (n / prev) ** 3


def _time_size(
    n: int, torch_dtype: torch.dtype, device_kind: str, min_time_s: float
) -> list[float]:
    import torch

    device = "cuda" if device_kind == "cuda" else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=torch_dtype, device=device, generator=gen)
    b = torch.randn(n, n, dtype=torch_dtype, device=device, generator=gen)
    out = torch.empty(n, n, dtype=torch_dtype, device=device)  # no allocator work in the loop
    return _repeat_timed(lambda: torch.matmul(a, b, out=out), device_kind, min_time_s)


def _repeat_timed(run: Callable[[], Any], device_kind: str, min_time_s: float) -> list[float]:
    """Discard the warm-up runs, then time batches of runs until ``min_time_s`` of wall time."""
    for _ in range(_WARMUP_RUNS[device_kind]):
        run()
    timer = StepTimer(device_kind)
    start = time.perf_counter()
    while True:
        for _ in range(_BATCH_RUNS):
            with timer.step():
                run()
        samples = timer.samples
        if time.perf_counter() - start >= min_time_s:
            return samples


def _describe(
    dtype: str, device_kind: str, best: int, runs: int, sizes: tuple[int, ...], tried: list[int]
) -> str:
    import torch

    precision = ""
    if dtype == "fp32":
        precision = f" (float32 matmul precision {torch.get_float32_matmul_precision()!r})"
    skipped = ", ".join(str(n) for n in sizes if n not in tried)
    note = f"; skipped as too slow: {skipped}" if skipped else ""
    warmup = _WARMUP_RUNS[device_kind]
    threads = f", {torch.get_num_threads()} threads" if device_kind == "cpu" else ""
    return (
        f"square matmul n={best} {dtype}{precision} on {device_kind}{threads}, median of {runs} timed runs "
        f"after {warmup} warm-up runs, best over n in {', '.join(map(str, tried))}{note}"
    )


_StoreFile = TypeAdapter(dict[str, dict[str, Ceiling]])


class CeilingStore:
    """Ceilings on disk: ``root/ceilings.json`` maps fingerprint key -> dtype -> Ceiling.

    A CPU ceiling measured at another torch thread count than one per CPU has its dtype
    tagged with the count (``fp32@1threads``, see ``threads_tag``): ranks sharing a host run
    fewer threads each, and their MFU is over what one of them reaches.

    Every write replaces the file atomically, so processes racing on it never leave a torn
    file; the last writer wins, which at worst costs one re-measurement.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / "ceilings.json"

    def get(self, fp: Fingerprint, dtype: str, *, threads: int | None = None) -> Ceiling | None:
        """The ceiling stored for exactly this fingerprint, dtype and thread count, or None."""
        return self._load().get(fp.key(), {}).get(dtype + threads_tag(threads))

    def put(self, ceiling: Ceiling) -> None:
        """Store ``ceiling`` under its own fingerprint key, replacing any for that dtype (and
        thread count)."""
        data = self._load()
        slot = ceiling.dtype + threads_tag(ceiling.threads)
        data.setdefault(ceiling.fingerprint_key, {})[slot] = ceiling
        atomic_write_text(self.path, _StoreFile.dump_json(data, indent=2).decode("utf-8") + "\n")

    def _load(self) -> dict[str, dict[str, Ceiling]]:
        return _load_store(self.path, _StoreFile, "ceilings")


def _load_store(path: Path, adapter: TypeAdapter[Any], what: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        # One line for the CLI, not a traceback: a cache another version wrote, or a torn copy.
        raise CeilingError(
            f"{path} is not a valid {what} file ({where}: {first['msg']}); delete it to re-measure"
        ) from None


def matmul_ceiling(
    dtype: Dtype, device_kind: Literal["cpu", "cuda"] = "cpu", *, cache_dir: Path | None = None
) -> Ceiling:
    """The stored matmul ceiling for this machine, measured and stored first if absent.

    A CPU ceiling is measured in this process, at its torch thread count; a GPU's by a child
    process, so that this one never opens a CUDA context.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``.
        device_kind: ``"cpu"`` or ``"cuda"``.
        cache_dir: where ``ceilings.json`` lives; default ``$AUTOTUNE_CACHE_DIR`` or
            ``~/.cache/autotune``.

    Raises:
        CeilingError: a GPU's ceiling was missing and its child failed to measure it.

    Example:
        >>> matmul_ceiling("fp32").flops_per_s  # doctest: +SKIP
        7.5e10
    """
    _check_dtype(dtype)
    root = cache_dir if cache_dir is not None else _default_cache_dir()
    store = CeilingStore(root)
    fp = current_fingerprint(device_kind)
    cached = store.get(fp, dtype, threads=_cpu_threads(device_kind))
    if cached is not None:
        return cached
    if device_kind == "cuda":
        _measure_in_child(["matmul", "--dtype", dtype], root, f"{dtype} matmul ceiling")
        return _stored(store.get(fp, dtype), fp, store.path)
    ceiling = measure_matmul_ceiling(dtype, device_kind)
    store.put(ceiling)
    return ceiling


def _measure_in_child(what_args: list[str], root: Path, what: str) -> None:
    """Measure a GPU figure in ``python -m profilers.ceilings``, which stores it in ``root``."""
    from profilers.isolation import run_isolated

    args = ["-m", "profilers.ceilings", *what_args, "--device", "cuda", "--cache-dir", str(root)]
    log = Path(root) / "ceilings-child.log"
    # profilers/__init__ imports this module before runpy runs it as __main__; runpy's warning
    # about that is harmless here (nothing compares the two copies' classes).
    run = run_isolated([sys.executable, "-W", "ignore::RuntimeWarning:runpy", *args],
                       timeout_s=_CHILD_TIMEOUT_S, mem_cap_bytes=None, log_path=log)
    if run.status is not Status.COMPLETE:
        command = " ".join(["python", *args])
        raise CeilingError(f"measuring the GPU's {what} in a child process failed "
                           f"({run.status.value}: {run.reason}); see {log}, or run `{command}` "
                           f"to see why")


def _stored(figure: Any, fp: Fingerprint, path: Path) -> Any:
    """What a child stored, or one line saying it stored nothing for this fingerprint."""
    if figure is None:
        raise CeilingError(f"the ceiling child exited without storing a figure for fingerprint "
                           f"{fp.key()} in {path} (it saw another environment?); see "
                           f"{path.parent / 'ceilings-child.log'}")
    return figure


def _default_cache_dir() -> Path:
    env = os.environ.get("AUTOTUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "autotune"


class Bandwidth(BaseModel):
    """A measured device-memory copy bandwidth, counted as STREAM copy counts it: every copied
    byte is read once and written once, so ``bytes_per_s`` is 2 x size / median copy time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_kind: Literal["cpu", "cuda"]
    bytes_per_s: float = Field(gt=0, description="read + write bytes per second")
    size_bytes: int = Field(gt=0, description="bytes in the source buffer (and in the target)")
    samples_s: list[float] = Field(min_length=1, description="every timed copy")
    method: str
    fingerprint_key: str
    threads: int | None = Field(default=None, ge=1, description="torch threads of the measuring "
                                "process on a CPU; None on a GPU")


def measure_copy_bandwidth(
    device_kind: Literal["cpu", "cuda"] = "cpu",
    *,
    size_bytes: int | None = None,
    min_time_s: float = 0.3,
) -> Bandwidth:
    """Measure the memory bandwidth of ``dst.copy_(src)`` between two large buffers.

    Warm-up copies are discarded (they fault in the target's pages); timed copies repeat
    until ``min_time_s`` of wall time and the median gives 2 x ``size_bytes`` / median.
    On CUDA the copies are timed with CUDA events (StepTimer) on device 0.

    Args:
        device_kind: ``"cpu"`` or ``"cuda"`` (device 0).
        size_bytes: bytes per buffer; default 256 MiB on CPU, 1 GiB on CUDA.
        min_time_s: timed wall time.

    Returns:
        The Bandwidth, keyed by the current fingerprint.
    """
    import torch

    fp = current_fingerprint(device_kind)  # first: it refuses an unknown or absent device
    size = size_bytes if size_bytes is not None else _DEFAULT_COPY_BYTES[device_kind]
    if size <= 0:
        raise ValueError(f"size_bytes={size} must be positive")
    device = "cuda" if device_kind == "cuda" else "cpu"
    device_ctx: AbstractContextManager[object] = (
        torch.cuda.device(0) if device_kind == "cuda" else nullcontext()
    )
    with device_ctx:
        src = torch.full((size,), 1, dtype=torch.uint8, device=device)  # touched: pages resident
        dst = torch.empty_like(src)
        samples = _repeat_timed(lambda: dst.copy_(src), device_kind, min_time_s)
    threads = f", {torch.get_num_threads()} threads" if device_kind == "cpu" else ""
    method = (
        f"dst.copy_(src) of {size} bytes on {device_kind}{threads}, median of {len(samples)} "
        f"timed copies after {_WARMUP_RUNS[device_kind]} warm-up copies; read + write bytes "
        "(2 x size) per copy, as STREAM copy"
    )
    return Bandwidth(
        device_kind=device_kind,
        bytes_per_s=2 * size / summarize(samples).median,
        size_bytes=size,
        samples_s=samples,
        method=method,
        fingerprint_key=fp.key(),
        threads=_cpu_threads(device_kind),
    )


_BandwidthFile = TypeAdapter(dict[str, Bandwidth])


class BandwidthStore:
    """Copy bandwidths on disk: ``root/bandwidth.json`` maps fingerprint key -> Bandwidth.

    Written atomically like CeilingStore, and beside it in the same cache folder. Unlike a
    ceiling, a bandwidth is not kept per thread count: only the driver measures and reads it
    (for the roofline prior), always at its own thread count; the record names that count.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / "bandwidth.json"

    def get(self, fp: Fingerprint) -> Bandwidth | None:
        """The bandwidth stored for exactly this fingerprint, or None."""
        data: dict[str, Bandwidth] = _load_store(self.path, _BandwidthFile, "bandwidth")
        return data.get(fp.key())

    def put(self, bandwidth: Bandwidth) -> None:
        """Store ``bandwidth`` under its own fingerprint key, replacing any there."""
        data: dict[str, Bandwidth] = _load_store(self.path, _BandwidthFile, "bandwidth")
        data[bandwidth.fingerprint_key] = bandwidth
        text = _BandwidthFile.dump_json(data, indent=2).decode("utf-8") + "\n"
        atomic_write_text(self.path, text)


def copy_bandwidth(
    device_kind: Literal["cpu", "cuda"] = "cpu", *, cache_dir: Path | None = None
) -> Bandwidth:
    """The stored copy bandwidth of this machine, measured and stored first if absent.

    A CPU's is measured in this process; a GPU's by a child process, as ``matmul_ceiling``
    measures a GPU's ceiling.

    Args:
        device_kind: ``"cpu"`` or ``"cuda"``.
        cache_dir: where ``bandwidth.json`` lives; default ``$AUTOTUNE_CACHE_DIR`` or
            ``~/.cache/autotune``.

    Raises:
        CeilingError: a GPU's bandwidth was missing and its child failed to measure it.

    Example:
        >>> copy_bandwidth("cpu").bytes_per_s  # doctest: +SKIP
        1.9e10
    """
    root = cache_dir if cache_dir is not None else _default_cache_dir()
    store = BandwidthStore(root)
    fp = current_fingerprint(device_kind)
    cached = store.get(fp)
    if cached is not None:
        return cached
    if device_kind == "cuda":
        _measure_in_child(["copy"], root, "copy bandwidth")
        return _stored(store.get(fp), fp, store.path)
    bandwidth = measure_copy_bandwidth(device_kind)
    store.put(bandwidth)
    return bandwidth


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One accelerator's datasheet figures; FLOP/s are dense (no structured sparsity).

    Attributes:
        name: the table's own name ("H100-SXM").
        memory_gb: device memory in GB (10^9 bytes, as datasheets count).
        bf16_tflops: BF16 on tensor / matrix cores, FP32 accumulation.
        fp32_matrix_tflops: what an fp32 matmul reaches on tensor / matrix cores: TF32 on
            NVIDIA, FP32 matrix (MFMA) on AMD CDNA. This is the figure the ``"fp32"`` dtype
            means throughout autotune.
        fp32_vector_tflops: plain FP32 on CUDA cores / vector units, no tensor cores.
        memory_bandwidth_gbs: device memory bandwidth in GB/s.
        interconnect: the GPU-to-GPU link of the usual configuration of this part.
        interconnect_gbs: that link's bandwidth per GPU, GB/s, both directions together.
    """

    name: str
    memory_gb: float
    bf16_tflops: float
    fp32_matrix_tflops: float
    fp32_vector_tflops: float
    memory_bandwidth_gbs: float
    interconnect: str
    interconnect_gbs: float

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``"bf16"``, or ``"fp32"`` meaning tensor / matrix cores."""
        _check_dtype(dtype)
        return (self.bf16_tflops if dtype == "bf16" else self.fp32_matrix_tflops) * 1e12


# Sources: NVIDIA A100, H100, H200 and L40S datasheets, the Ada Lovelace architecture
# whitepaper (RTX 4090, GeForce figures with FP32 accumulation, which training uses; FP16
# accumulation is twice as fast) and AMD's Instinct MI250X specifications. Datasheets quote
# tensor-core figures with 2:4 sparsity; the dense figure is half of that. Names are matched
# against torch.cuda.get_device_name() lower-cased, with runs of spaces, '_' and '-' made one
# space; the first matching row wins, so the 40 GB A100 rows come before the 80 GB ones.
# PCIe cards list PCIe as their interconnect: an NVLink bridge pairs at most two of them.
_NVLINK3, _NVLINK4 = ("NVLink 3", 600.0), ("NVLink 4", 900.0)
_PCIE4, _PCIE5 = ("PCIe Gen4 x16", 64.0), ("PCIe Gen5 x16", 128.0)
_INFINITY_FABRIC = ("Infinity Fabric", 800.0 / 2)  # per GCD: half of the package's 8 links


def _row(name: str, mem: float, bf16: float, fp32_matrix: float, fp32_vector: float,
         bw: float, link: tuple[str, float]) -> Accelerator:
    return Accelerator(name, float(mem), bf16, fp32_matrix, fp32_vector, float(bw), *link)


_DATASHEET: tuple[tuple[str, Accelerator], ...] = (
    # The SXM H100 of Meta's clusters that torchtitan publishes on: 96 GB of HBM2e at 2.4
    # TB/s, a 500 W default power limit (700 W TDP); "the actual peak TFLOPs number is
    # between SXM and NVL, and we don't know its exact value" (torchtitan's benchmarks/
    # llama3_h100_202412_torchtitan.md). The SXM figure is listed, as torchtitan's MFU uses.
    (
        r"\bh100\b.*\b96 ?gb\b.*\bhbm2e\b",
        _row("H100-SXM-96GB-HBM2e", 96, 989.4, 494.7, 67.0, 2400, _NVLINK4),
    ),
    (
        r"\bh100\b(?!.*\b(pcie|nvl)\b).*\b(sxm\d?|hbm3)\b",
        _row("H100-SXM", 80, 989.4, 494.7, 67.0, 3350, _NVLINK4),
    ),
    (r"\bh100\b.*\bpcie\b", _row("H100-PCIe", 80, 756.5, 378.0, 51.0, 2000, _PCIE5)),
    (r"\bh200\b(?!.*\bnvl\b)", _row("H200", 141, 989.4, 494.7, 67.0, 4800, _NVLINK4)),
    (
        r"\ba100\b(?=.*\b40gb\b).*\bsxm\d?\b",
        _row("A100-SXM-40GB", 40, 312.0, 156.0, 19.5, 1555, _NVLINK3),
    ),
    (r"\ba100\b.*\bsxm\d?\b", _row("A100-SXM-80GB", 80, 312.0, 156.0, 19.5, 2039, _NVLINK3)),
    (
        r"\ba100\b(?=.*\b40gb\b).*\bpcie\b",
        _row("A100-PCIe-40GB", 40, 312.0, 156.0, 19.5, 1555, _PCIE4),
    ),
    (r"\ba100\b.*\bpcie\b", _row("A100-PCIe", 80, 312.0, 156.0, 19.5, 1935, _PCIE4)),
    (r"\bl40s\b", _row("L40S", 48, 362.05, 183.0, 91.6, 864, _PCIE4)),
    (r"\brtx 4090\b(?!.*\b(d|laptop)\b)", _row("RTX-4090", 24, 165.2, 82.6, 82.6, 1008, _PCIE4)),
    # torch sees each of the MI250X's two dies (GCDs) as one device, reported as "AMD Instinct
    # MI250X" or "AMD Instinct MI250X/MI250": the figures are per GCD, half of the package's
    # 128 GB, 3276.8 GB/s, 383 BF16, 95.7 FP32 matrix, 47.9 FP32 vector TFLOP/s and 8 x 100
    # GB/s Infinity Fabric links.
    (
        r"\bmi250x\b",
        _row("MI250X-GCD", 128 / 2, 383.0 / 2, 95.7 / 2, 47.9 / 2, 3276.8 / 2, _INFINITY_FABRIC),
    ),
)


def datasheet(device_name: str) -> Accelerator | None:
    """The datasheet row of a known accelerator, or None for one not in the table.

    Args:
        device_name: as ``torch.cuda.get_device_name`` reports it ("NVIDIA H100 80GB HBM3")
            or a table name ("H100-SXM").

    Example:
        >>> datasheet("NVIDIA H100 80GB HBM3").memory_bandwidth_gbs
        3350.0
    """
    name = re.sub(r"[\s_\-]+", " ", device_name.lower()).strip()
    for pattern, row in _DATASHEET:
        if re.search(pattern, name):
            return row
    return None


def datasheet_names() -> list[str]:
    """The table's own names, for messages that say which GPUs it knows."""
    return [row.name for _, row in _DATASHEET]


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """Dense datasheet peak FLOP/s of a known GPU, or None for a GPU not in the table.

    Args:
        device_name: as ``torch.cuda.get_device_name`` reports it ("NVIDIA H100 80GB HBM3")
            or a table name ("H100-SXM").
        dtype: ``"bf16"``, or ``"fp32"`` meaning TF32 tensor cores (FP32 matrix cores on AMD).

    Example:
        >>> datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16")
        312000000000000.0
    """
    _check_dtype(dtype)
    row = datasheet(device_name)
    return row.peak_flops(dtype) if row is not None else None


def main(argv: list[str] | None = None) -> int:
    """``python -m profilers.ceilings matmul --dtype fp32 | copy [--device cuda]``: measure one
    figure in this process and store it (the child ``matmul_ceiling`` and ``copy_bandwidth``
    start for a GPU)."""
    p = argparse.ArgumentParser(prog="python -m profilers.ceilings")
    p.add_argument("what", choices=("matmul", "copy"))
    p.add_argument("--dtype", choices=_DTYPES, default="fp32", help="matmul only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--cache-dir", type=Path, help="default $AUTOTUNE_CACHE_DIR or ~/.cache/autotune")
    args = p.parse_args(argv)
    root = args.cache_dir if args.cache_dir is not None else _default_cache_dir()
    if args.device == "cuda":
        import torch

        # As the ranks run fp32 (autotune.train.distributed): on TF32 tensor cores, which the
        # datasheet's fp32 figure also means.
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.what == "matmul":
        ceiling = measure_matmul_ceiling(args.dtype, args.device)
        CeilingStore(root).put(ceiling)
        print(f"{ceiling.flops_per_s:.4g} FLOP/s: {ceiling.method}")
    else:
        bandwidth = measure_copy_bandwidth(args.device)
        BandwidthStore(root).put(bandwidth)
        print(f"{bandwidth.bytes_per_s:.4g} B/s: {bandwidth.method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
