"""Matmul ceilings: the FLOP/s this machine really reaches, measured once per fingerprint and
stored; and the datasheet peaks of common GPUs, for MFU against the vendor's figure.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from profilers.fingerprint import current_fingerprint
from profilers.records import Fingerprint
from profilers.store import atomic_write_text
from profilers.timer import StepTimer, summarize

if TYPE_CHECKING:
    import torch

__all__ = ["Ceiling", "CeilingStore", "datasheet_peak", "matmul_ceiling", "measure_matmul_ceiling"]

Dtype = Literal["fp32", "bf16"]
_DTYPES: tuple[str, ...] = ("fp32", "bf16")
_DEFAULT_SIZES = {"cpu": (1024, 2048), "cuda": (4096, 8192)}
# Discarded runs: cuBLAS builds its handle and picks its kernel on the first calls; a CPU BLAS
# only needs one run to fault in the operands and spin up its thread pool.
_WARMUP_RUNS = {"cpu": 1, "cuda": 2}
# Runs per timed batch: a median needs at least three, and on CUDA each batch ends with one
# synchronize so that wall-clock progress reflects work done rather than work queued.
_BATCH_RUNS = 3


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


def measure_matmul_ceiling(
    dtype: Dtype,
    device_kind: Literal["cpu", "cuda"] = "cpu",
    *,
    sizes: tuple[int, ...] | None = None,
    min_time_s: float = 0.3,
    max_run_s: float = 5.0,
) -> Ceiling:
    """Measure the dense matmul FLOP/s this device reaches in ``dtype``.

    For each square size n (ascending): warm-up runs are discarded, timed runs repeat until
    ``min_time_s`` of wall time, and the median run gives 2 n^3 / median FLOP/s. The ceiling is
    the best of these. A size whose run is predicted (from the previous size, scaled by n^3)
    to take longer than ``max_run_s`` is skipped: CPUs without bf16 units emulate bf16 matmul
    at ~1 GFLOP/s and would otherwise spend minutes on it.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``. On CUDA, fp32 runs under torch's current float32 matmul
            precision (TF32 or not), which ``method`` records.
        device_kind: ``"cpu"`` or ``"cuda"`` (device 0).
        sizes: matrix sizes to try; default (1024, 2048) on CPU, (4096, 8192) on CUDA.
        min_time_s: timed wall time per size.
        max_run_s: longest predicted single run of a size still tried.

    Returns:
        The Ceiling, keyed by the current fingerprint.
    """
    import torch

    _check_dtype(dtype)
    fp = current_fingerprint(device_kind)  # first: it refuses an unknown or absent device
    sizes = tuple(sorted(sizes or _DEFAULT_SIZES[device_kind]))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    device_ctx: AbstractContextManager[object] = (
        torch.cuda.device(0) if device_kind == "cuda" else nullcontext()
    )
    results: dict[int, list[float]] = {}
    with device_ctx:
        for n in sizes:
            if results and _predicted_run_s(results, n) > max_run_s:
                break
            results[n] = _time_size(n, torch_dtype, device_kind, min_time_s)
    best = max(results, key=lambda n: _flops(n) / summarize(results[n]).median)
    samples = results[best]
    return Ceiling(
        dtype=dtype,
        device_kind=device_kind,
        flops_per_s=_flops(best) / summarize(samples).median,
        size=best,
        samples_s=samples,
        method=_describe(dtype, device_kind, best, len(samples), sizes, list(results)),
        fingerprint_key=fp.key(),
    )


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
    for _ in range(_WARMUP_RUNS[device_kind]):
        torch.matmul(a, b, out=out)
    timer = StepTimer(device_kind)
    start = time.perf_counter()
    while True:
        for _ in range(_BATCH_RUNS):
            with timer.step():
                torch.matmul(a, b, out=out)
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
    return (
        f"square matmul n={best} {dtype}{precision} on {device_kind}, median of {runs} timed runs "
        f"after {warmup} warm-up runs, best over n in {', '.join(map(str, tried))}{note}"
    )


_StoreFile = TypeAdapter(dict[str, dict[str, Ceiling]])


class CeilingStore:
    """Ceilings on disk: ``root/ceilings.json`` maps fingerprint key -> dtype -> Ceiling.

    Every write replaces the file atomically, so processes racing on it never leave a torn
    file; the last writer wins, which at worst costs one re-measurement.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / "ceilings.json"

    def get(self, fp: Fingerprint, dtype: str) -> Ceiling | None:
        """The ceiling stored for exactly this fingerprint and dtype, or None."""
        return self._load().get(fp.key(), {}).get(dtype)

    def put(self, ceiling: Ceiling) -> None:
        """Store ``ceiling`` under its own fingerprint key, replacing any for that dtype."""
        data = self._load()
        data.setdefault(ceiling.fingerprint_key, {})[ceiling.dtype] = ceiling
        atomic_write_text(self.path, _StoreFile.dump_json(data, indent=2).decode("utf-8") + "\n")

    def _load(self) -> dict[str, dict[str, Ceiling]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return _StoreFile.validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "top level"
            raise ValueError(
                f"{self.path} is not a valid ceilings file ({where}: {first['msg']}); "
                "delete it to re-measure"
            ) from None


def matmul_ceiling(
    dtype: Dtype, device_kind: Literal["cpu", "cuda"] = "cpu", *, cache_dir: Path | None = None
) -> Ceiling:
    """The stored matmul ceiling for this machine, measured and stored first if absent.

    Args:
        dtype: ``"fp32"`` or ``"bf16"``.
        device_kind: ``"cpu"`` or ``"cuda"``.
        cache_dir: where ``ceilings.json`` lives; default ``$AUTOTUNE_CACHE_DIR`` or
            ``~/.cache/autotune``.

    Example:
        >>> matmul_ceiling("fp32").flops_per_s  # doctest: +SKIP
        7.5e10
    """
    _check_dtype(dtype)
    store = CeilingStore(cache_dir if cache_dir is not None else _default_cache_dir())
    cached = store.get(current_fingerprint(device_kind), dtype)
    if cached is not None:
        return cached
    ceiling = measure_matmul_ceiling(dtype, device_kind)
    store.put(ceiling)
    return ceiling


def _default_cache_dir() -> Path:
    env = os.environ.get("AUTOTUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "autotune"


# Dense (no structured sparsity) tensor-core peaks from NVIDIA's datasheets, in TFLOP/s.
# "fp32" is the TF32 tensor-core figure: that is what fp32 matmuls reach when TF32 is
# allowed, and the only fp32 figure an MFU against tensor-core peak makes sense for; plain
# FP32 (CUDA cores) is 5-15x lower. RTX 4090 is the GeForce figure with FP32 accumulation,
# which training uses (FP16 accumulation is twice as fast). A100-SXM 40 GB and 80 GB share
# peaks, so both match that row.
_DATASHEET_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (
        "H100-SXM",
        r"\bh100\b(?!.*\b(pcie|nvl)\b).*\b(sxm\d?|hbm3)\b",
        {"bf16": 989.4, "fp32": 494.7},
    ),
    ("H100-PCIe", r"\bh100\b.*\bpcie\b", {"bf16": 756.5, "fp32": 378.0}),
    ("H200", r"\bh200\b(?!.*\bnvl\b)", {"bf16": 989.4, "fp32": 494.7}),
    ("A100-SXM-80GB", r"\ba100\b.*\bsxm\d?\b", {"bf16": 312.0, "fp32": 156.0}),
    ("A100-PCIe", r"\ba100\b.*\bpcie\b", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", r"\bl40s\b", {"bf16": 362.05, "fp32": 183.0}),
    ("RTX-4090", r"\brtx 4090\b(?!.*\b(d|laptop)\b)", {"bf16": 165.2, "fp32": 82.6}),
)


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """Dense datasheet peak FLOP/s of a known GPU, or None for a GPU not in the table.

    Args:
        device_name: as ``torch.cuda.get_device_name`` reports it ("NVIDIA H100 80GB HBM3")
            or a table name ("H100-SXM").
        dtype: ``"bf16"``, or ``"fp32"`` meaning TF32 tensor cores.

    Example:
        >>> datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16")
        312000000000000.0
    """
    _check_dtype(dtype)
    name = re.sub(r"[\s_\-]+", " ", device_name.lower()).strip()
    for _, pattern, peaks in _DATASHEET_TFLOPS:
        if re.search(pattern, name):
            return peaks[dtype] * 1e12
    return None
