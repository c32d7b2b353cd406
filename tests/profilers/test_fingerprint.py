from __future__ import annotations

import hashlib
import json
import platform
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from profilers import fingerprint as fpmod
from profilers.fingerprint import current_fingerprint
from profilers.records import Fingerprint


def test_key_is_stable_across_calls() -> None:
    a, b = current_fingerprint(), current_fingerprint()
    assert a == b
    assert a.key() == b.key()
    assert len(a.key()) == 16 and int(a.key(), 16) >= 0


def test_key_is_sha256_of_sorted_compact_json(fingerprint: Fingerprint) -> None:
    body = json.dumps(fingerprint.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert fingerprint.key() == hashlib.sha256(body.encode()).hexdigest()[:16]


def test_key_changes_with_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = current_fingerprint()
    monkeypatch.setattr(torch, "get_num_threads", lambda: before.threads + 1)
    after = current_fingerprint()
    assert after.threads == before.threads + 1
    assert after.key() != before.key()


def test_key_changes_with_package_version(fingerprint: Fingerprint) -> None:
    assert fingerprint.model_copy(update={"package_version": "1"}).key() != fingerprint.key()


def test_fingerprint_is_frozen(fingerprint: Fingerprint) -> None:
    with pytest.raises(ValidationError):
        fingerprint.threads = 8


def test_cpu_fingerprint_describes_this_process() -> None:
    fp = current_fingerprint("cpu", package_version="1.2.3")
    assert fp.threads == torch.get_num_threads()
    assert fp.torch_version == torch.__version__
    assert fp.cuda_version == torch.version.cuda
    assert fp.driver_version is None and fp.package_version == "1.2.3"
    assert fp.python_version == ".".join(map(str, sys.version_info[:3]))


def test_cpu_model_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: X\nmodel name\t: Fake CPU @ 3.0GHz\nflags\t: a b\n"
    )
    assert fpmod._cpu_model(info) == "Fake CPU @ 3.0GHz"


def test_cpu_model_falls_back_to_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "processor", lambda: "fallback-cpu")
    assert fpmod._cpu_model(tmp_path / "missing") == "fallback-cpu"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert fpmod._cpu_model(tmp_path / "arm") == "fallback-cpu"


def test_unknown_device_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'tpu'"):
        current_fingerprint("tpu")  # type: ignore[arg-type]


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(version: object, fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail:
            raise _FakeNVMLError("NVML Shared Library Not Found")

    mod.NVMLError = _FakeNVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: version  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"NVIDIA H100 80GB HBM3 #{i}")


@pytest.mark.parametrize("reported", [b"550.54.15", "550.54.15"])
def test_cuda_fingerprint_reads_device_and_driver(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch, reported: object
) -> None:
    nvml = _fake_pynvml(reported)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    fp = current_fingerprint("cuda")
    assert (fp.device_kind, fp.device_name, fp.device_count) == (
        "cuda",
        "NVIDIA H100 80GB HBM3 #0",
        8,
    )
    assert fp.driver_version == "550.54.15"
    assert nvml.calls == ["init", "shutdown"]


def test_cuda_driver_is_none_without_nvml(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert current_fingerprint("cuda").driver_version is None
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml("1", fail=True))
    assert current_fingerprint("cuda").driver_version is None


def test_cuda_fingerprint_refused_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        current_fingerprint("cuda")
