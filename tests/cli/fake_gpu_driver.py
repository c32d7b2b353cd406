"""Play a process of a machine with two H100s, on this CPU-only machine.

``python fake_gpu_driver.py autotune ARGS...`` runs ``autotune ARGS...`` as the driver: torch
sees two CUDA devices (``is_available``, ``device_count``: neither creates a context), NVML
reports two H100s, and every call that would initialise CUDA in this process (create a
context) appends what was called, and from where, to ``$FAKE_GPU_MARKER`` and raises. Only
this process is faked: the ranks and children it starts are plain processes of this machine
(a rank with device cuda crashes here, which is a recorded measurement, not the driver's
failure).

``python fake_gpu_driver.py seed CACHE_DIR`` plays the child that measures a GPU's ceilings
(a process allowed to use CUDA): it stores made-up ceilings and copy bandwidth for the
fingerprint this simulated machine has, as that child would after measuring them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# By its path: tests/ on sys.path would make tests/kernels shadow autotune's kernels package.
_spec = importlib.util.spec_from_file_location("fake_nvml", Path(__file__).parent.parent / "fake_nvml.py")
assert _spec is not None and _spec.loader is not None
fake_nvml = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_nvml)

# What creates a CUDA context, or initialises torch's CUDA state on the way to one.
_CONTEXT_CALLS = ("_lazy_init", "init", "current_device", "set_device", "get_device_properties",
                  "get_device_name", "get_device_capability", "synchronize", "mem_get_info",
                  "_exchange_device", "_maybe_exchange_device")


def _forbidden(name: str, marker: Path) -> Callable[..., object]:
    def call(*args: object, **kwargs: object) -> object:
        with open(marker, "a") as fh:
            fh.write(f"{name} called in pid {os.getpid()}:\n{''.join(traceback.format_stack())}\n")
        raise RuntimeError(f"the driver initialised CUDA: {name}")
    return call


def _simulate_gpus() -> None:
    sys.modules["pynvml"] = fake_nvml.make()
    torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 2  # type: ignore[assignment]


def driver(argv: list[str]) -> int:
    marker = Path(os.environ["FAKE_GPU_MARKER"])
    _simulate_gpus()
    for name in _CONTEXT_CALLS:
        setattr(torch.cuda, name, _forbidden(f"torch.cuda.{name}", marker))
    torch._C._cuda_init = _forbidden("torch._C._cuda_init", marker)  # type: ignore[attr-defined,assignment]
    from autotune.cli import main

    return main(argv)


def seed(cache_dir: Path) -> int:
    _simulate_gpus()
    # A process allowed to use CUDA: the device name as torch would give it.
    torch.cuda.get_device_name = lambda device=None: fake_nvml.H100  # type: ignore[assignment]
    from profilers.ceilings import Bandwidth, BandwidthStore, Ceiling, CeilingStore
    from profilers.fingerprint import current_fingerprint

    key = current_fingerprint("cuda").key()
    for dtype, flops in (("fp32", 4.0e14), ("bf16", 7.0e14)):
        CeilingStore(cache_dir).put(Ceiling.model_validate({
            "dtype": dtype, "device_kind": "cuda", "flops_per_s": flops, "size": 8192,
            "samples_s": [2 * 8192**3 / flops] * 3, "method": "seeded by the test",
            "fingerprint_key": key}))
    BandwidthStore(cache_dir).put(Bandwidth(
        device_kind="cuda", bytes_per_s=3.0e12, size_bytes=2**30, samples_s=[2 * 2**30 / 3.0e12] * 3,
        method="seeded by the test", fingerprint_key=key))
    print(key)
    return 0


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    sys.exit(driver(rest) if mode == "autotune" else seed(Path(rest[0])))
