from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import fake_nvml
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


def test_key_follows_the_cpus_not_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = current_fingerprint()
    monkeypatch.setattr(torch, "get_num_threads", lambda: before.threads + 3)
    assert current_fingerprint() == before  # a rank's own thread count is no new machine
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(before.threads + 1)))
    after = current_fingerprint()
    assert after.threads == before.threads + 1
    assert after.key() != before.key()


def test_driver_and_a_rank_with_other_threads_share_the_fingerprint() -> None:
    """A rank (here a child process, as torchrun starts one) sets its own thread count; its
    fingerprint, and so every cache it reads, is still the driver's."""
    threads = torch.get_num_threads() + 1
    code = ("import json, torch; from profilers.fingerprint import current_fingerprint; "
            f"torch.set_num_threads({threads}); fp = current_fingerprint('cpu', '1.0'); "
            "print(json.dumps([torch.get_num_threads(), fp.key()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    child_threads, child_key = json.loads(done.stdout.strip().splitlines()[-1])
    assert child_threads == threads != torch.get_num_threads()
    assert child_key == current_fingerprint("cpu", "1.0").key()


def test_key_changes_with_package_version(fingerprint: Fingerprint) -> None:
    assert fingerprint.model_copy(update={"package_version": "1"}).key() != fingerprint.key()


def test_fingerprint_is_frozen(fingerprint: Fingerprint) -> None:
    with pytest.raises(ValidationError):
        fingerprint.threads = 8


def test_cpu_fingerprint_describes_this_process() -> None:
    fp = current_fingerprint("cpu", package_version="1.2.3")
    assert fp.threads == len(os.sched_getaffinity(0))
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


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees CUDA (without a context: is_available needs none); anything that would
    create a context fails the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fingerprint initialised CUDA")

    for name in ("_lazy_init", "get_device_name", "get_device_properties", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)


@pytest.mark.parametrize("reported", [b"550.54.15", "550.54.15"])
def test_cuda_fingerprint_reads_devices_and_driver_through_nvml(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch, reported: object
) -> None:
    nvml = fake_nvml.make([fake_nvml.H100] * 8, driver=reported)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    fp = current_fingerprint("cuda")
    assert (fp.device_kind, fp.device_name, fp.device_count) == ("cuda", fake_nvml.H100, 8)
    assert fp.driver_version == "550.54.15" and fp.cuda_version == torch.version.cuda
    assert nvml.calls == ["init", "shutdown"]


A100 = "NVIDIA A100-SXM4-80GB"
UUIDS = [f"GPU-{c}{c}{c}{c}0000-1111-2222-3333-444444444444" for c in "abcd"]


@pytest.mark.parametrize(("visible", "name", "count"), [
    ("2,3", fake_nvml.H100, 2),
    ("1", A100, 1),
    ("3,0", f"{A100} + {fake_nvml.H100}", 2),  # the set of names, whatever CUDA's order
    ("1,7,2", A100, 1),  # CUDA stops at the first index that names no device
    (UUIDS[3], fake_nvml.H100, 1),
    (f"{UUIDS[2][:10]},{UUIDS[0]}", f"{A100} + {fake_nvml.H100}", 2),  # a unique UUID prefix
    ("GPU-", None, 0),  # a prefix of every UUID names none
    ("1,1", None, 0),  # a device named twice: CUDA sees none
    ("-1", None, 0),
])
def test_cuda_fingerprint_counts_the_visible_devices(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch, visible: str, name: str | None, count: int
) -> None:
    nvml = fake_nvml.make([A100, A100, fake_nvml.H100, fake_nvml.H100], uuids=UUIDS)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if count == 0:
        with pytest.raises(ValueError, match="no GPU is visible"):
            current_fingerprint("cuda")
    else:
        fp = current_fingerprint("cuda")
        assert (fp.device_name, fp.device_count) == (name, count)
    assert nvml.calls == ["init", "shutdown"]


def test_cuda_fingerprint_asks_a_child_without_nvml(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without NVML the names come from torch in a child process, never from this one."""
    monkeypatch.setattr(fpmod, "_child_names", {})
    monkeypatch.setattr(fpmod, "_CHILD_CODE", f"print({json.dumps([fake_nvml.H100] * 2)!r})")
    for nvml in (None, fake_nvml.make(fail_init=True)):  # not installed; no driver library
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        fpmod._child_names.clear()
        fp = current_fingerprint("cuda")
        assert (fp.device_name, fp.device_count, fp.driver_version) == (fake_nvml.H100, 2, None)
    monkeypatch.setattr(fpmod, "_CHILD_CODE", "raise SystemExit('no CUDA driver')")
    fpmod._child_names.clear()
    with pytest.raises(ValueError, match="no CUDA driver.*install nvidia-ml-py") as info:
        current_fingerprint("cuda")
    assert "\n" not in str(info.value)


def test_cuda_fingerprint_refused_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        current_fingerprint("cuda")
