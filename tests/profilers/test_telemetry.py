"""Telemetry: NVML paths through a scripted fake of the installed pynvml module, the host
probe for real (RSS of an allocation, CPU of a busy loop, a child's memory)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import psutil
import pynvml
import pytest

from profilers.records import Fingerprint, Measurement, Status
from profilers.telemetry import HostProbe, NvmlProbe, Probe, Telemetry, energy_per_token

MB = 1_000_000
HANDLE = object()


class FakeNvml:
    """Scripted replacements for the pynvml calls Telemetry makes; each metric's values are
    consumed one per call, and ``fail`` maps a function name to the NVML error code it raises
    (on every call, or only on the listed call numbers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mem_bytes = [1_000 * MB, 5_000 * MB, 3_000 * MB]
        self.util_pct = [10, 50, 90]
        self.sm_mhz = [1410, 1980, 1755]
        self.power_mw = [100_000, 300_000, 250_000]
        self.energy_mj = [1_000_000, 1_750_500]  # read at start and at stop
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, tuple[int, set[int] | None]] = {}
        self.handle_args: list[object] = []
        fakes = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetHandleByIndex": self._handle,
            "nvmlDeviceGetHandleByUUID": self._handle,
            "nvmlDeviceGetMemoryInfo": lambda h: _Struct(used=self._next("mem_bytes", h)),
            "nvmlDeviceGetUtilizationRates": lambda h: _Struct(gpu=self._next("util_pct", h)),
            "nvmlDeviceGetClockInfo": self._clock,
            "nvmlDeviceGetPowerUsage": lambda h: self._next("power_mw", h),
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: self._next("energy_mj", h),
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(pynvml, name, self._counted(name, fake))

    def _counted(self, name: str, fake: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls[name] += 1
            code, on_calls = self.fail.get(name, (0, set()))
            if code and (on_calls is None or self.calls[name] in on_calls):
                raise pynvml.NVMLError(code)
            return fake(*args)

        return call

    def _handle(self, which: object) -> object:
        self.handle_args.append(which)
        return HANDLE

    def _next(self, metric: str, handle: object) -> int:
        assert handle is HANDLE
        return getattr(self, metric).pop(0)

    def _clock(self, handle: object, kind: int) -> int:
        assert kind == pynvml.NVML_CLOCK_SM
        return self._next("sm_mhz", handle)


class _Struct:
    def __init__(self, **fields: int) -> None:
        self.__dict__.update(fields)


def _clock(*times: float) -> Any:
    it: Iterator[float] = iter(times)
    return lambda: next(it)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    return FakeNvml(monkeypatch)


def _three_samples(probes: list[Probe] | None = None, **kwargs: Any) -> Telemetry:
    """Enter, one explicit sample, exit: samples at t = 0, 1, 3 s of a 3 s window."""
    # clock calls: start, sample at entry, explicit sample, sample at exit, stop
    clock = _clock(100.0, 100.0, 101.0, 103.0, 103.0)
    with Telemetry("cuda", interval_s=None, clock=clock, probes=probes, **kwargs) as tel:
        tel.sample_once()
    return tel


def test_nvml_summary_matches_hand_computation(nvml: FakeNvml) -> None:
    s = _three_samples([NvmlProbe(0)]).summary()
    assert s.samples == 3 and s.duration_s == 3.0
    assert s.gpu_mem_used_peak_bytes == 5_000 * MB
    assert s.gpu_util_mean_pct == pytest.approx((10 + 50 + 90) / 3, rel=1e-12)
    assert s.sm_clock_mean_mhz == pytest.approx((1410 + 1980 + 1755) / 3, rel=1e-12)
    assert s.power_mean_w == pytest.approx((100 + 300 + 250) / 3, rel=1e-12)
    assert s.energy_j == pytest.approx((1_750_500 - 1_000_000) / 1000, rel=1e-12)  # 750.5 J
    # trapezoids over t = 0, 1, 3 s: 1 x (100 + 300) / 2 + 2 x (300 + 250) / 2
    assert s.power_integral_j == pytest.approx(200 + 550, rel=1e-12)
    assert s.sources == ("nvml",) and s.unsupported == ()
    assert s.cpu_util_mean_pct is None and s.rss_peak_bytes is None  # no host probe given
    assert nvml.calls["nvmlInit"] == 1 and nvml.calls["nvmlShutdown"] == 1
    assert nvml.handle_args == [0]


def test_default_cuda_probes_pick_the_gpu_by_uuid(nvml: FakeNvml) -> None:
    s = _three_samples(device_index=3, device_uuid="GPU-1234").summary()
    assert nvml.handle_args == ["GPU-1234"]
    assert s.sources == ("psutil", "nvml")
    assert s.energy_j == pytest.approx(750.5, rel=1e-12)
    assert s.rss_peak_bytes is not None and s.rss_peak_bytes > 0


def test_not_supported_metrics_are_none_and_not_asked_again(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    not_supported = (pynvml.NVML_ERROR_NOT_SUPPORTED, None)
    nvml.fail = {"nvmlDeviceGetPowerUsage": not_supported,
                 "nvmlDeviceGetTotalEnergyConsumption": not_supported}
    with caplog.at_level(logging.DEBUG, logger="profilers.telemetry"):
        s = _three_samples([NvmlProbe(0)]).summary()
    assert s.power_mean_w is None and s.power_integral_j is None and s.energy_j is None
    assert s.unsupported == ("energy_counter", "power_w")
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 1  # refused once, then never asked
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1  # at start, not at stop
    # the metrics NVML does support are unaffected
    assert s.gpu_mem_used_peak_bytes == 5_000 * MB
    assert s.gpu_util_mean_pct == pytest.approx(50.0, rel=1e-12)
    assert s.sm_clock_mean_mhz == pytest.approx(1715.0, rel=1e-12)
    notes = [r for r in caplog.records if "not supported" in r.getMessage()]
    assert len(notes) == 2 and all(r.levelno == logging.INFO for r in notes)


def test_not_supported_subclass_instance_is_recognised(nvml: FakeNvml) -> None:
    assert isinstance(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED), pynvml.NVMLError_NotSupported)
    nvml.fail = {"nvmlDeviceGetClockInfo": (pynvml.NVML_ERROR_NOT_SUPPORTED, None)}
    s = _three_samples([NvmlProbe(0)]).summary()
    assert s.sm_clock_mean_mhz is None and s.unsupported == ("sm_clock_mhz",)


def test_other_nvml_error_costs_one_reading(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    nvml.fail = {"nvmlDeviceGetUtilizationRates": (pynvml.NVML_ERROR_UNKNOWN, {3})}
    nvml.util_pct = [10, 50]  # the third call raises before taking a value
    with caplog.at_level(logging.WARNING, logger="profilers.telemetry"):
        s = _three_samples([NvmlProbe(0)]).summary()
    assert s.gpu_util_mean_pct == pytest.approx((10 + 50) / 2, rel=1e-12)
    assert s.unsupported == ()
    assert len(caplog.records) == 1 and "gpu_util_pct" in caplog.records[0].getMessage()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_nvml_that_does_not_initialise_leaves_an_empty_gpu_probe(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    nvml.fail = {"nvmlInit": (code, None)}
    with caplog.at_level(logging.DEBUG, logger="profilers.telemetry"):
        s = _three_samples().summary()
    _assert_empty_gpu(s, caplog)
    assert sum(nvml.calls.values()) == 1  # nvmlInit, and nothing after it


def test_missing_pynvml_leaves_an_empty_gpu_probe(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with caplog.at_level(logging.DEBUG, logger="profilers.telemetry"):
        s = _three_samples().summary()
    _assert_empty_gpu(s, caplog)
    assert "nvidia-ml-py" in caplog.records[0].getMessage()


def test_absent_device_leaves_an_empty_gpu_probe(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    nvml.fail = {"nvmlDeviceGetHandleByIndex": (pynvml.NVML_ERROR_INVALID_ARGUMENT, None)}
    with caplog.at_level(logging.DEBUG, logger="profilers.telemetry"):
        s = _three_samples(device_index=7).summary()
    _assert_empty_gpu(s, caplog)
    assert "index=7" in caplog.records[0].getMessage()
    assert nvml.calls["nvmlShutdown"] == 1  # the initialised library is released


def _assert_empty_gpu(s: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert s.samples == 3 and s.sources == ("psutil",)
    gpu = (s.gpu_mem_used_peak_bytes, s.gpu_util_mean_pct, s.sm_clock_mean_mhz, s.power_mean_w,
           s.energy_j, s.power_integral_j)
    assert gpu == (None,) * 6
    assert s.rss_peak_bytes is not None and s.rss_peak_bytes > 0  # the host probe still works


class ScriptedProbe(Probe):
    name = "scripted"
    fields: ClassVar[tuple[str, ...]] = ("cpu_pct",)

    def __init__(self, values: list[float | None], fail_on: int | None = None) -> None:
        self.values, self.fail_on, self.reads = values, fail_on, 0

    def read(self) -> dict[str, float | int | None]:
        self.reads += 1
        if self.reads == self.fail_on:
            raise ZeroDivisionError("probe bug")
        return {"cpu_pct": self.values.pop(0)}


def test_cpu_utilization_mean_is_weighted_by_sample_interval() -> None:
    # samples at t = 0, 3, 4 s: 100 % for three seconds, 0 % for one
    clock = _clock(0.0, 0.0, 3.0, 4.0, 4.0)
    with Telemetry("cpu", interval_s=None, clock=clock,
                   probes=[ScriptedProbe([None, 100.0, 0.0])]) as tel:
        tel.sample_once()
    assert tel.summary().cpu_util_mean_pct == pytest.approx((100 * 3 + 0 * 1) / 4, rel=1e-12)
    frame = tel.frame()
    assert list(frame.columns) == ["t_s", "cpu_pct"] and list(frame["t_s"]) == [0.0, 3.0, 4.0]


def test_a_failing_probe_in_the_thread_is_reported_on_exit() -> None:
    probe = ScriptedProbe([None, 1.0, 2.0, 3.0], fail_on=2)  # the thread's first sample
    with pytest.raises(RuntimeError, match="sampling thread failed") as info:
        with Telemetry("cpu", interval_s=0.001, probes=[probe]):
            _wait_for(lambda: probe.reads >= 2)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_background_thread_samples_until_exit() -> None:
    with Telemetry("cpu", interval_s=0.005) as tel:
        _wait_for(lambda: len(tel.samples) >= 5)
    n = len(tel.samples)
    time.sleep(0.05)
    assert len(tel.samples) == n  # the thread stopped with the block
    times = [float(row["t_s"] or 0.0) for row in tel.samples]
    assert times == sorted(times) and tel.summary().samples == n


def _wait_for(condition: Any, limit_s: float = 60.0) -> None:
    """Poll until ``condition()``; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def test_host_probe_sees_an_allocation() -> None:
    before = psutil.Process().memory_info().rss
    with Telemetry("cpu", interval_s=None) as tel:
        block = np.full(200 * MB // 8, 1.0)  # written, so every page is resident
        tel.sample_once()
        del block
    s = tel.summary()
    assert s.rss_peak_bytes is not None
    assert s.rss_peak_bytes - before >= 150 * MB


def test_host_probe_sees_a_busy_loop() -> None:
    proc = psutil.Process()
    with Telemetry("cpu", interval_s=None) as tel:
        start = sum(proc.cpu_times()[:2])
        while sum(proc.cpu_times()[:2]) - start < 0.2:  # 0.2 s of CPU, however long it takes
            pass
        busy = tel.sample_once()
    assert tel.samples[0]["cpu_pct"] is None  # no interval before the first sample
    assert busy["cpu_pct"] is not None and busy["cpu_pct"] > 0
    s = tel.summary()
    assert s.cpu_util_mean_pct is not None and s.cpu_util_mean_pct > 0


def test_host_probe_counts_children() -> None:
    code = ("import sys, numpy as np; a = np.full(150_000_000 // 8, 1.0); "
            "print('ready', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        probe = HostProbe()
        probe.open()
        # Like with like: the probe's one reading bracketed by readings of both processes
        # taken just before and just after it (the child is idle, blocked on its stdin).
        before = [psutil.Process(p).memory_info().rss for p in (os.getpid(), child.pid)]
        tree_rss = probe.read()["rss_bytes"]
        after = [psutil.Process(p).memory_info().rss for p in (os.getpid(), child.pid)]
    finally:
        child.kill()
        child.wait()
    assert min(before[1], after[1]) >= 150 * MB
    assert tree_rss is not None
    page = 4096 * 16  # RSS is counted in pages, read process by process
    assert min(sum(before), sum(after)) - page <= tree_rss <= max(sum(before), sum(after)) + page


def test_summary_goes_into_a_measurement(nvml: FakeNvml) -> None:
    s = _three_samples([NvmlProbe(0)]).summary()
    extra = s.to_extra()
    m = Measurement.model_validate_json(
        Measurement(status=Status.COMPLETE, extra=extra).model_dump_json())
    assert m.extra["telemetry_energy_j"] == pytest.approx(750.5, rel=1e-12)
    assert m.extra["telemetry_sources"] == "nvml"
    assert all(key.startswith("telemetry_") for key in extra)


def test_energy_per_token() -> None:
    assert energy_per_token(750.5, 1000) == pytest.approx(0.7505, rel=1e-12)
    assert energy_per_token(None, 1000) is None
    with pytest.raises(ValueError, match="tokens=0"):
        energy_per_token(1.0, 0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="'tpu'"):
        Telemetry("tpu")
    with pytest.raises(ValueError, match="interval_s=0"):
        Telemetry("cpu", interval_s=0)
    with pytest.raises(RuntimeError, match="outside its with block"):
        Telemetry("cpu").sample_once()


# The worker's use of telemetry (autotune/train/worker.py measure_trial), kept beside the
# probes it scripts: the GPU path runs here on CPU with the fake NVML standing in.

TINY_RUN = {
    "workload": {
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64},
        "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128},
        "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4},
    },
    "schedule": {"policy": "pack", "micro_batch_tokens": 64},
}


def test_measure_trial_reports_counter_energy(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint
) -> None:
    import torch

    from autotune.config import RunConfig
    from autotune.train import worker
    from autotune.train.distributed import ParallelContext
    from profilers.ceilings import Ceiling

    ceiling = Ceiling(dtype="fp32", device_kind="cpu", flops_per_s=1e10, size=64,
                      samples_s=[2 * 64**3 / 1e10], method="test", fingerprint_key=fingerprint.key())
    monkeypatch.setattr(worker, "matmul_ceiling", lambda dtype, kind: ceiling)
    monkeypatch.setattr(worker, "_telemetry", lambda kind, ctx: Telemetry(
        "cuda", interval_s=None, probes=[HostProbe(), NvmlProbe(0)]))
    rc = RunConfig.model_validate(TINY_RUN)
    m = worker.measure_trial(rc, ParallelContext(device=torch.device("cpu")), steps=2, warmup=0,
                             fault=None)
    assert m is not None and m.status is Status.COMPLETE
    tokens = float(m.extra["tokens_per_step"]) * 2  # type: ignore[arg-type]
    assert m.energy_j == pytest.approx(750.5, rel=1e-12)  # the counter delta, nothing else
    assert m.energy_per_token_j == pytest.approx(750.5 / tokens, rel=1e-12)
    assert m.extra["telemetry_samples"] == 2  # entry and exit: no thread with interval None
    assert m.extra["telemetry_power_mean_w"] == pytest.approx((100 + 300) / 2, rel=1e-12)
    assert m.extra["telemetry_gpu_mem_used_peak_bytes"] == 5_000 * MB


def test_worker_samples_its_own_gpu_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import torch

    from autotune.train import worker
    from autotune.train.distributed import ParallelContext

    seen: list[int] = []

    def props(index: int) -> types.SimpleNamespace:
        seen.append(index)
        return types.SimpleNamespace(uuid="58e3c9b5-0000-1111-2222-333344445555")

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    tel = worker._telemetry("cuda", ParallelContext(device=torch.device("cuda", 1)))
    gpu = [p for p in tel.probes if isinstance(p, NvmlProbe)]
    assert seen == [1] and len(gpu) == 1
    assert (gpu[0].index, gpu[0].uuid) == (1, "GPU-58e3c9b5-0000-1111-2222-333344445555")
    cpu = worker._telemetry("cpu", ParallelContext(device=torch.device("cpu")))
    assert [type(p) for p in cpu.probes] == [HostProbe]
