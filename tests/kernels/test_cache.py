"""The tuning cache keeps its last whole state through a crash mid-write, refuses another
device's cache, and forgets configs of a kernel whose source changed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels.cache import CacheMismatch, TuningCache, shape_bucket

SHAPE = {"m": 1000, "n": 256, "k": 64}


@pytest.fixture
def kernel_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "toy_kernel.py"
    path.write_text("def run(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_kernel", raising=False)  # this test's file
    return path


def test_shape_buckets_round_up_to_powers_of_two() -> None:
    assert shape_bucket({"n": 256, "m": 1000, "k": 1}) == "k=1,m=1024,n=256"
    assert shape_bucket({"m": 513}) == shape_bucket({"m": 1024}) != shape_bucket({"m": 512})


def test_round_trip(tmp_path: Path, kernel_module: Path) -> None:
    cache = TuningCache.load(tmp_path / "c.json", "fp1", {"device_name": "cpu"})
    cache.put("toy", SHAPE, "fp32", {"block": 64}, module="toy_kernel", seconds=1e-3, measured=5)
    cache.save()
    back = TuningCache.load(tmp_path / "c.json", "fp1")
    assert back.get("toy", {"m": 1024, "n": 256, "k": 64}, "fp32", module="toy_kernel") == {"block": 64}
    assert back.get("toy", SHAPE, "bf16", module="toy_kernel") is None


def test_another_devices_cache_is_refused(tmp_path: Path, kernel_module: Path) -> None:
    cache = TuningCache.load(tmp_path / "c.json", "fp1", {"device_name": "A100"})
    cache.put("toy", SHAPE, "fp32", {"block": 64}, module="toy_kernel", seconds=1e-3, measured=5)
    cache.save()
    with pytest.raises(CacheMismatch, match="tuned on device fp1 .A100., this is fp2"):
        TuningCache.load(tmp_path / "c.json", "fp2")


def test_a_changed_kernel_gets_no_stale_config(tmp_path: Path, kernel_module: Path) -> None:
    cache = TuningCache.load(tmp_path / "c.json", "fp1")
    cache.put("toy", SHAPE, "fp32", {"block": 64}, module="toy_kernel", seconds=1e-3, measured=5)
    cache.save()
    kernel_module.write_text("def run(x):\n    return x * 1\n")  # the kernel changed
    back = TuningCache.load(tmp_path / "c.json", "fp1")
    assert back.get("toy", SHAPE, "fp32", module="toy_kernel") is None
    assert back.stale({"toy": "toy_kernel"}) == ["toy|k=64,m=1024,n=256|fp32"]


def test_a_crash_mid_write_leaves_the_previous_cache_whole(tmp_path: Path,
                                                            kernel_module: Path) -> None:
    path = tmp_path / "c.json"
    cache = TuningCache.load(path, "fp1")
    cache.put("toy", SHAPE, "fp32", {"block": 64}, module="toy_kernel", seconds=1e-3, measured=5)
    cache.save()
    before = path.read_text()
    # A second process adds many entries and is killed with SIGKILL after writing half of
    # the new file, before the rename.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import profilers.store as store
        from kernels.cache import TuningCache

        real_fsync = os.fsync
        def die(fd):
            os.write(fd, b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = die
        cache = TuningCache.load({str(path)!r}, "fp1")
        for m in range(1, 200):
            cache.put("toy", {{"m": m * 100}}, "fp32", {{"block": m}}, module="toy_kernel",
                      seconds=1.0, measured=1)
        cache.save()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert path.read_text() == before  # the old cache, whole
    assert json.loads(path.read_text())["entries"]
    back = TuningCache.load(path, "fp1")
    assert back.get("toy", SHAPE, "fp32", module="toy_kernel") == {"block": 64}
