"""Copy bandwidth (measured for real on CPU, stored per fingerprint) and the datasheet table."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from profilers import ceilings
from profilers.ceilings import (
    Bandwidth,
    BandwidthStore,
    CeilingError,
    copy_bandwidth,
    datasheet,
    datasheet_peak,
    measure_copy_bandwidth,
)
from profilers.fingerprint import current_fingerprint
from profilers.records import Fingerprint

MiB = 2**20


@pytest.fixture
def tiny_copy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make copy_bandwidth measure an 8 MiB copy, and record each measurement's device."""
    calls: list[str] = []
    real = ceilings.measure_copy_bandwidth

    def measure(device_kind: str = "cpu") -> Bandwidth:
        calls.append(device_kind)
        return real(device_kind, size_bytes=8 * MiB, min_time_s=0.01)  # type: ignore[arg-type]

    monkeypatch.setattr(ceilings, "measure_copy_bandwidth", measure)
    return calls


def test_measured_copy_bandwidth_is_consistent_with_its_samples() -> None:
    b = measure_copy_bandwidth(size_bytes=16 * MiB, min_time_s=0.05)
    assert b.device_kind == "cpu" and b.size_bytes == 16 * MiB
    assert len(b.samples_s) >= 3 and all(s > 0 for s in b.samples_s)
    # read + write: two bytes of traffic per byte copied
    assert b.bytes_per_s == pytest.approx(2 * 16 * MiB / statistics.median(b.samples_s), rel=1e-12)
    assert b.fingerprint_key == current_fingerprint("cpu").key()
    assert f"{16 * MiB} bytes" in b.method and "2 x size" in b.method


def test_bad_copy_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size_bytes=0"):
        measure_copy_bandwidth(size_bytes=0)


def test_second_call_reuses_stored_bandwidth(
    tmp_path: Path, tiny_copy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = copy_bandwidth("cpu", cache_dir=tmp_path)
    assert tiny_copy == ["cpu"] and first.bytes_per_s > 0
    stored = json.loads((tmp_path / "bandwidth.json").read_text())
    assert stored[first.fingerprint_key]["bytes_per_s"] == first.bytes_per_s

    def must_not_measure(*args: object, **kwargs: object) -> Bandwidth:
        raise AssertionError("re-measured a stored bandwidth")

    monkeypatch.setattr(ceilings, "measure_copy_bandwidth", must_not_measure)
    assert copy_bandwidth("cpu", cache_dir=tmp_path) == first
    assert BandwidthStore(tmp_path).get(current_fingerprint("cpu")) == first


def test_other_fingerprint_is_measured_again(
    tmp_path: Path, tiny_copy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_bandwidth("cpu", cache_dir=tmp_path)
    real_fp = current_fingerprint()
    other = real_fp.model_copy(update={"threads": real_fp.threads + 1})
    monkeypatch.setattr(ceilings, "current_fingerprint", lambda device_kind="cpu": other)
    copy_bandwidth("cpu", cache_dir=tmp_path)
    assert tiny_copy == ["cpu", "cpu"]
    stored = json.loads((tmp_path / "bandwidth.json").read_text())
    assert set(stored) == {real_fp.key(), other.key()}


def test_bandwidth_store_sits_beside_the_ceilings(tmp_path: Path, fingerprint: Fingerprint) -> None:
    b = Bandwidth(device_kind="cpu", bytes_per_s=2e10, size_bytes=MiB, samples_s=[1e-4] * 3,
                  method="test", fingerprint_key=fingerprint.key())
    BandwidthStore(tmp_path).put(b)
    assert BandwidthStore(tmp_path).get(fingerprint) == b
    assert not (tmp_path / "ceilings.json").exists()  # the two stores do not share a file
    other = fingerprint.model_copy(update={"threads": fingerprint.threads + 1})
    assert BandwidthStore(tmp_path).get(other) is None


def test_corrupt_bandwidth_store_names_the_file(tmp_path: Path, fingerprint: Fingerprint) -> None:
    path = tmp_path / "bandwidth.json"
    path.write_text('{"k": {"bytes_per_s": -1}}')
    with pytest.raises(CeilingError) as info:
        BandwidthStore(tmp_path).get(fingerprint)
    assert str(path) in str(info.value) and "bandwidth file" in str(info.value)


# Hand-copied from the vendors' datasheets: memory GB, dense BF16 TFLOP/s, dense TF32 (AMD:
# FP32 matrix) TFLOP/s, plain FP32 TFLOP/s, memory GB/s, interconnect, its GB/s per GPU.
@pytest.mark.parametrize(
    ("device_name", "row"),
    [
        ("NVIDIA H100 80GB HBM3", ("H100-SXM", 80, 989.4, 494.7, 67, 3350, "NVLink 4", 900)),
        ("NVIDIA H100 PCIe", ("H100-PCIe", 80, 756.5, 378, 51, 2000, "PCIe Gen5 x16", 128)),
        ("NVIDIA H200", ("H200", 141, 989.4, 494.7, 67, 4800, "NVLink 4", 900)),
        ("NVIDIA A100-SXM4-80GB", ("A100-SXM-80GB", 80, 312, 156, 19.5, 2039, "NVLink 3", 600)),
        ("NVIDIA A100-SXM4-40GB", ("A100-SXM-40GB", 40, 312, 156, 19.5, 1555, "NVLink 3", 600)),
        ("NVIDIA A100 80GB PCIe", ("A100-PCIe", 80, 312, 156, 19.5, 1935, "PCIe Gen4 x16", 64)),
        ("NVIDIA A100-PCIE-40GB", ("A100-PCIe-40GB", 40, 312, 156, 19.5, 1555, "PCIe Gen4 x16", 64)),
        ("NVIDIA L40S", ("L40S", 48, 362.05, 183, 91.6, 864, "PCIe Gen4 x16", 64)),
        ("NVIDIA GeForce RTX 4090", ("RTX-4090", 24, 165.2, 82.6, 82.6, 1008, "PCIe Gen4 x16", 64)),
        # one GCD, half of the package's 128 GB, 383, 95.7, 47.9 TFLOP/s, 3276.8 GB/s, 8 x 100 GB/s
        ("AMD Instinct MI250X", ("MI250X-GCD", 64, 191.5, 47.85, 23.95, 1638.4, "Infinity Fabric", 400)),
        ("AMD Instinct MI250X/MI250", ("MI250X-GCD", 64, 191.5, 47.85, 23.95, 1638.4,
                                       "Infinity Fabric", 400)),
    ],
)
def test_datasheet_rows(device_name: str, row: tuple) -> None:
    acc = datasheet(device_name)
    assert acc is not None
    name, mem, bf16, fp32_matrix, fp32_vector, bw, link, link_gbs = row
    assert (acc.name, acc.interconnect) == (name, link)
    got = (acc.memory_gb, acc.bf16_tflops, acc.fp32_matrix_tflops, acc.fp32_vector_tflops,
           acc.memory_bandwidth_gbs, acc.interconnect_gbs)
    assert got == pytest.approx((mem, bf16, fp32_matrix, fp32_vector, bw, link_gbs), rel=1e-9)
    # datasheet_peak keeps its meaning: "fp32" is the tensor / matrix-core figure
    assert datasheet_peak(device_name, "bf16") == pytest.approx(bf16 * 1e12, rel=1e-9)
    assert datasheet_peak(device_name, "fp32") == pytest.approx(fp32_matrix * 1e12, rel=1e-9)


@pytest.mark.parametrize(
    "device_name",
    ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA L40", "Tesla V100-SXM2-16GB", "AMD Instinct MI250",
     "AMD Instinct MI300X", "Intel(R) Xeon(R) Platinum 8480+", ""],
)
def test_unknown_device_has_no_datasheet(device_name: str) -> None:
    assert datasheet(device_name) is None
    assert datasheet_peak(device_name, "fp32") is None


def test_datasheet_rows_are_frozen() -> None:
    acc = datasheet("H100-SXM")
    assert acc is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        acc.memory_gb = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="'fp16'"):
        acc.peak_flops("fp16")
