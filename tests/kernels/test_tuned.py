"""Kernel configs at training time: pinned, else the cache's for the shape's bucket, else the
default; a foreign cache is refused at start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autotune import __version__
from autotune.config import RunConfig
from kernels.cache import CacheMismatch, TuningCache
from kernels.registry import KERNELS
from kernels.tuned import KernelChooser
from profilers.fingerprint import current_fingerprint

SHAPE = {"tokens": 1000, "hidden": 192, "vocab": 2048}


def _cache(path: Path, key: str) -> Path:
    c = TuningCache.load(path, key)
    c.put("linear_ce", SHAPE, "fp32", {"chunk_tokens": 512}, module="kernels.cache",
          seconds=1e-3, measured=3)
    c.save()
    return path


def _kernels(**kw) -> object:
    return RunConfig.model_validate({"kernels": {"loss": "fused", **kw}}).kernels


def test_pinned_then_cached_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KERNELS, "linear_ce",
                        dataclasses.replace(KERNELS["linear_ce"], module="kernels.cache"))
    default = KERNELS["linear_ce"].default
    here = current_fingerprint("cpu", __version__).key()
    path = _cache(tmp_path / "c.json", here)
    chooser = KernelChooser.for_run(_kernels(), "fp32", "cpu", path)
    near, far = SHAPE | {"tokens": 900}, SHAPE | {"tokens": 4000}  # same bucket, another one
    assert chooser.config("linear_ce", near) == {"chunk_tokens": 512}
    assert chooser.config("linear_ce", far) == default
    pinned = KernelChooser.for_run(_kernels(configs={"linear_ce": {"chunk_tokens": 64}}), "fp32",
                                   "cpu", path)
    assert pinned.config("linear_ce", SHAPE) == {"chunk_tokens": 64}
    none = KernelChooser.for_run(_kernels(tuning_cache="none"), "fp32", "cpu", path)
    assert none.config("linear_ce", SHAPE) == default
    missing = KernelChooser.for_run(_kernels(), "fp32", "cpu", tmp_path / "absent.json")
    assert missing.config("linear_ce", SHAPE) == default


def test_a_cache_of_another_device_is_refused(tmp_path: Path) -> None:
    path = _cache(tmp_path / "c.json", "another-device")
    with pytest.raises(CacheMismatch, match="tuned on device another-device"):
        KernelChooser.for_run(_kernels(tuning_cache=str(path)), "fp32", "cpu", None)
