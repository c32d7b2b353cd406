from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import fake_nvml
import pytest
import torch

from profilers import ceilings, isolation
from profilers.ceilings import (
    Bandwidth,
    Ceiling,
    CeilingError,
    CeilingStore,
    copy_bandwidth,
    datasheet_peak,
    matmul_ceiling,
    measure_matmul_ceiling,
)
from profilers.fingerprint import current_fingerprint
from profilers.records import Fingerprint, Status


def _ceiling(fp: Fingerprint, dtype: str = "fp32", flops: float = 1e11) -> Ceiling:
    n = 128
    return Ceiling(
        dtype=dtype,  # type: ignore[arg-type]
        device_kind="cpu",
        flops_per_s=flops,
        size=n,
        samples_s=[2 * n**3 / flops] * 3,
        method="test",
        fingerprint_key=fp.key(),
    )


@pytest.fixture
def tiny_measure(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make matmul_ceiling measure tiny matrices, and record each measurement's dtype."""
    calls: list[str] = []
    real = ceilings.measure_matmul_ceiling

    def measure(dtype: str, device_kind: str = "cpu") -> Ceiling:
        calls.append(dtype)
        return real(dtype, device_kind, sizes=(64,), min_time_s=0.01, windows_n=1)  # type: ignore[arg-type]

    monkeypatch.setattr(ceilings, "measure_matmul_ceiling", measure)
    return calls


def test_measured_ceiling_is_consistent_with_its_samples() -> None:
    c = measure_matmul_ceiling("fp32", sizes=(64, 128), min_time_s=0.05)
    assert c.size in (64, 128)
    assert len(c.samples_s) >= 3
    assert c.flops_per_s > 0
    recomputed = 2 * c.size**3 / statistics.median(c.samples_s)
    assert c.flops_per_s == pytest.approx(recomputed, rel=1e-12)
    assert c.fingerprint_key == current_fingerprint("cpu").key()
    assert f"n={c.size}" in c.method and "64, 128" in c.method


def test_size_predicted_too_slow_is_skipped() -> None:
    c = measure_matmul_ceiling("fp32", sizes=(128, 64), max_run_s=0.0, min_time_s=0.01)
    assert c.size == 64  # sizes run smallest first; 128 is predicted over the 0 s limit
    assert "skipped as too slow: 128" in c.method


def test_bf16_ceiling_is_measured() -> None:
    c = measure_matmul_ceiling("bf16", sizes=(32,), min_time_s=0.01)
    assert c.dtype == "bf16" and c.size == 32 and c.flops_per_s > 0


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'fp16'"):
        measure_matmul_ceiling("fp16", sizes=(8,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'fp16'"):
        matmul_ceiling("fp16", cache_dir=tmp_path)  # type: ignore[arg-type]


def test_store_round_trips(tmp_path: Path, fingerprint: Fingerprint) -> None:
    c32, c16 = _ceiling(fingerprint, "fp32", 1e11), _ceiling(fingerprint, "bf16", 3e11)
    CeilingStore(tmp_path).put(c32)
    CeilingStore(tmp_path).put(c16)
    fresh = CeilingStore(tmp_path)  # reads the file, not a memory of the puts
    assert fresh.get(fingerprint, "fp32") == c32
    assert fresh.get(fingerprint, "bf16") == c16
    raw = json.loads((tmp_path / "ceilings.json").read_text())
    assert raw[fingerprint.key()]["bf16"]["flops_per_s"] == 3e11


def test_store_does_not_serve_another_fingerprint(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = CeilingStore(tmp_path)
    store.put(_ceiling(fingerprint))
    other = fingerprint.model_copy(update={"threads": fingerprint.threads + 1})
    assert store.get(other, "fp32") is None
    assert store.get(fingerprint, "bf16") is None


@pytest.mark.parametrize(
    "content",
    ["{not json", '["a list"]', '{"k": {"fp32": {"dtype": "fp32"}}}', '{"k": {"fp32": 1.0}}'],
)
def test_corrupt_store_names_the_file(
    tmp_path: Path, fingerprint: Fingerprint, content: str
) -> None:
    path = tmp_path / "ceilings.json"
    path.write_text(content)
    with pytest.raises(CeilingError) as info:
        CeilingStore(tmp_path).get(fingerprint, "fp32")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_corrupt_cache_stops_a_command_in_one_line(tmp_path: Path) -> None:
    """Not a traceback: the CLI names the file and what to do, exit 1."""
    import subprocess

    (tmp_path / "ceilings.json").write_text('{"k": {"fp32": 1.0}}')
    done = subprocess.run([sys.executable, "-m", "autotune", "predict", "examples/chunkflow.yaml",
                           "--models", "prior"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AUTOTUNE_CACHE_DIR": str(tmp_path)},
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "delete it to re-measure" in lines[0], done.stderr


def test_second_call_reuses_stored_ceiling(
    tmp_path: Path, tiny_measure: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = matmul_ceiling("fp32", cache_dir=tmp_path)
    assert tiny_measure == ["fp32"]
    assert (tmp_path / "ceilings.json").is_file()

    def must_not_measure(*args: object, **kwargs: object) -> Ceiling:
        raise AssertionError("re-measured a stored ceiling")

    monkeypatch.setattr(ceilings, "measure_matmul_ceiling", must_not_measure)
    assert matmul_ceiling("fp32", cache_dir=tmp_path) == first


def test_other_dtype_and_fingerprint_are_measured(
    tmp_path: Path, tiny_measure: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    matmul_ceiling("fp32", cache_dir=tmp_path)
    matmul_ceiling("bf16", cache_dir=tmp_path)
    assert tiny_measure == ["fp32", "bf16"]
    real_fp = current_fingerprint()
    other = real_fp.model_copy(update={"threads": real_fp.threads + 1})
    monkeypatch.setattr(ceilings, "current_fingerprint", lambda device_kind="cpu": other)
    matmul_ceiling("fp32", cache_dir=tmp_path)
    assert tiny_measure == ["fp32", "bf16", "fp32"]
    stored = json.loads((tmp_path / "ceilings.json").read_text())
    assert set(stored) == {real_fp.key(), other.key()}
    assert {c["dtype"] for c in stored[real_fp.key()].values()} == {"fp32", "bf16"}


def test_default_cache_dir_comes_from_environment(
    tmp_path: Path, tiny_measure: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    matmul_ceiling("fp32")
    assert (tmp_path / "cache" / "ceilings.json").is_file()
    monkeypatch.delenv("AUTOTUNE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ceilings._default_cache_dir() == tmp_path / "home" / ".cache" / "autotune"


def test_cpu_ceiling_is_kept_per_thread_count(tmp_path: Path, tiny_measure: list[str]) -> None:
    """Ranks sharing a host run fewer threads each; their ceiling is what such a rank reaches,
    measured (once) apart from the full-thread one under the same fingerprint."""
    threads = torch.get_num_threads()
    full = matmul_ceiling("fp32", cache_dir=tmp_path)
    assert full.threads == threads and f", {threads} threads" in full.method
    torch.set_num_threads(threads + 1)
    try:
        other = matmul_ceiling("fp32", cache_dir=tmp_path)
        assert matmul_ceiling("fp32", cache_dir=tmp_path) == other
    finally:
        torch.set_num_threads(threads)
    assert tiny_measure == ["fp32", "fp32"] and other.threads == threads + 1
    assert matmul_ceiling("fp32", cache_dir=tmp_path) == full  # stored, not measured again
    stored = json.loads((tmp_path / "ceilings.json").read_text())
    assert [len(by_slot) for by_slot in stored.values()] == [2]


def test_cpu_figures_never_start_a_child(
    tmp_path: Path, tiny_measure: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a CPU figure started a child process")

    monkeypatch.setattr(isolation, "run_isolated", no_child)
    monkeypatch.setattr(ceilings, "measure_copy_bandwidth", lambda device_kind="cpu": Bandwidth(
        device_kind="cpu", bytes_per_s=1e10, size_bytes=2**20, samples_s=[2e-4] * 3, method="t",
        fingerprint_key=current_fingerprint("cpu").key()))
    assert matmul_ceiling("fp32", cache_dir=tmp_path).device_kind == "cpu"
    assert copy_bandwidth("cpu", cache_dir=tmp_path).bytes_per_s == 1e10


@pytest.fixture
def gpu_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as the driver on a machine with two H100s: it may count them, but any
    call that would create a CUDA context fails the test."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the driver initialised CUDA")

    for name in ("_lazy_init", "init", "get_device_name", "get_device_properties",
                 "current_device", "set_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, forbidden)


def test_gpu_ceiling_is_measured_by_a_child_and_read_back(
    tmp_path: Path, gpu_driver: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[list[str]] = []

    def child(argv: list[str], **kwargs: object) -> isolation.IsolatedRun:
        # What `python -m profilers.ceilings ARGS` does, run here with its GPU timing faked.
        started.append(argv)
        module = argv.index("profilers.ceilings")
        assert argv[module - 1] == "-m" and argv[0] == sys.executable
        ceilings.main(argv[module + 1:])
        return isolation.IsolatedRun(Status.COMPLETE, 0, 1.0, 0, "", "")

    def timed_on_gpu(dtype: str, device_kind: str = "cpu") -> Ceiling:
        assert device_kind == "cuda"
        return Ceiling(dtype=dtype, device_kind="cuda", flops_per_s=4e14,  # type: ignore[arg-type]
                       size=8192, samples_s=[2.75e-3] * 3, method="timed on the GPU",
                       fingerprint_key=current_fingerprint("cuda").key())

    monkeypatch.setattr(isolation, "run_isolated", child)
    monkeypatch.setattr(ceilings, "measure_matmul_ceiling", timed_on_gpu)
    got = matmul_ceiling("bf16", "cuda", cache_dir=tmp_path)
    assert (got.device_kind, got.flops_per_s, got.threads) == ("cuda", 4e14, None)
    assert started and started[0][-6:] == ["--dtype", "bf16", "--device", "cuda",
                                           "--cache-dir", str(tmp_path)]
    assert matmul_ceiling("bf16", "cuda", cache_dir=tmp_path) == got
    assert len(started) == 1  # the second call read the stored figure


def test_failed_gpu_ceiling_child_is_one_line_naming_what_to_do(
    tmp_path: Path, gpu_driver: None
) -> None:
    """The real child, on this machine without a GPU, cannot measure: the driver says so in
    one line, with the child's log and the command that shows why."""
    with pytest.raises(CeilingError) as info:
        matmul_ceiling("fp32", "cuda", cache_dir=tmp_path)
    message = str(info.value)
    log = tmp_path / "ceilings-child.log"
    assert "\n" not in message and "fp32 matmul ceiling" in message and str(log) in message
    assert "python -m profilers.ceilings matmul --dtype fp32 --device cuda" in message
    assert "torch sees no CUDA device" in log.read_text()
    assert not (tmp_path / "ceilings.json").exists()


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        # torch.cuda.get_device_name() spellings, dense figures from NVIDIA datasheets
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.7),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", 156.0),
        ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 4090", "fp32", 82.6),
        # the table's own names
        ("H100-SXM", "bf16", 989.4),
        ("H100-PCIe", "fp32", 378.0),
        ("A100-SXM-80GB", "bf16", 312.0),
        ("RTX-4090", "bf16", 165.2),
    ],
)
def test_datasheet_peak_known_gpus(name: str, dtype: str, tflops: float) -> None:
    assert datasheet_peak(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100 NVL",
        "NVIDIA H200 NVL",
        "NVIDIA L40",
        "NVIDIA GeForce RTX 4090 D",
        "Tesla V100-SXM2-16GB",
        "AMD EPYC",
    ],
)
def test_datasheet_peak_unknown_gpu_is_none(name: str) -> None:
    assert datasheet_peak(name, "bf16") is None


def test_the_fastest_of_several_windows_is_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three windows, the second run while the machine was twice as fast: its figure is
    kept (2 n^3 / median), and the method says how many windows were taken."""
    speeds = iter([1.0, 2.0, 1.0])

    def timed(n: int, torch_dtype: object, device_kind: str, min_time_s: float) -> list[float]:
        s = next(speeds)
        return [2 * n**3 / (1e9 * s)] * 3  # 1 or 2 GFLOP/s

    monkeypatch.setattr(ceilings, "_time_size", timed)
    # A quiet machine, whatever this host is doing: a window that other processes disturbed
    # would be timed again and draw a fourth speed.
    from profilers import ops

    class Quiet:
        fraction = 0.0

        def __enter__(self) -> Quiet:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(ops, "_ForeignCPU", Quiet)
    c = measure_matmul_ceiling("fp32", sizes=(64,), windows_n=3)
    assert c.flops_per_s == pytest.approx(2e9, rel=1e-12)
    assert "best of 3 windows" in c.method


def test_a_window_other_processes_disturbed_is_measured_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from profilers import ops

    shares = iter([0.6, 0.05])
    timings = iter([0.5, 2.0])  # GFLOP/s while disturbed, then undisturbed

    class Foreign:
        def __enter__(self) -> Foreign:
            self.fraction = next(shares)
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(ops, "_ForeignCPU", Foreign)
    monkeypatch.setattr(ceilings.time, "sleep", lambda s: None)
    monkeypatch.setattr(ceilings, "_time_size",
                        lambda n, d, k, t: [2 * n**3 / (1e9 * next(timings))] * 3)
    c = measure_matmul_ceiling("fp32", sizes=(64,), windows_n=1)
    assert c.flops_per_s == pytest.approx(2e9, rel=1e-12)
    assert "other processes used 5% of the CPU" in c.method


def test_a_step_that_outruns_the_ceiling_measures_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint) -> None:
    """A cached ceiling measured while the machine was busy (58 GFLOP/s) and a step at
    90 GFLOP/s per rank: the ceiling is measured again; the higher one is stored and used.
    A re-measurement no higher keeps the old one, and nothing is measured for a step
    below the ceiling."""
    from profilers.ceilings import remeasure_if_outrun

    old = _ceiling(fingerprint, flops=58e9)
    calls = []

    def again(flops: float):  # noqa: ANN202
        def measure(dtype: str, device_kind: str = "cpu") -> Ceiling:
            calls.append(dtype)
            return _ceiling(fingerprint, flops=flops)
        return measure

    monkeypatch.setattr(ceilings, "measure_matmul_ceiling", again(188e9))
    assert remeasure_if_outrun(old, 40e9, cache_dir=tmp_path) is old and calls == []
    new = remeasure_if_outrun(old, 90e9, cache_dir=tmp_path)
    assert new.flops_per_s == 188e9 and calls == ["fp32"]
    assert CeilingStore(tmp_path).get(fingerprint, "fp32").flops_per_s == 188e9
    monkeypatch.setattr(ceilings, "measure_matmul_ceiling", again(50e9))
    assert remeasure_if_outrun(old, 90e9, cache_dir=tmp_path / "other") is old


def test_an_mfu_above_one_is_withheld() -> None:
    from autotune.config import RunConfig
    from autotune.train.worker import _mfu

    c = _ceiling(current_fingerprint("cpu"), flops=50e9)
    rc = RunConfig.model_validate({})
    mfu, source, extra = _mfu(80e9, c, rc, world=2)
    assert mfu == pytest.approx(0.8)
    mfu, source, extra = _mfu(120e9, c, rc, world=2)
    assert mfu is None and "withheld" in source and extra["mfu_withheld"] == pytest.approx(1.2)
