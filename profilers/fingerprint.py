"""The environment fingerprint of this process: what a stored figure is only valid for.

Two rules keep one machine's processes on one fingerprint. Nothing here opens a CUDA context:
GPUs are described through NVML (the driver's management library), because the ``autotune``
process computes fingerprints to key its caches, and a context of its own would hold memory
on GPU 0 for the whole run, leaving rank 0 less than its peers. And the fingerprint counts
the CPUs a process may run on, which the ranks inherit, never torch's thread count, which
each rank sets for itself; a figure whose speed depends on that count says so in its own
record (``threads_tag``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from profilers.records import Fingerprint

__all__ = ["current_fingerprint", "machine_cpus", "threads_tag"]

_CPUINFO = Path("/proc/cpuinfo")
# Where NVML is missing: torch in a child process names the GPUs (it may open a context there).
_CHILD_CODE = ("import json, torch; print(json.dumps([torch.cuda.get_device_name(i) "
               "for i in range(torch.cuda.device_count())]))")
_CHILD_TIMEOUT_S = 300.0
_child_names: dict[str | None, list[str]] = {}  # CUDA_VISIBLE_DEVICES -> names, per process


def current_fingerprint(
    device_kind: Literal["cpu", "cuda"] = "cpu", package_version: str = "0"
) -> Fingerprint:
    """Describe the device, drivers, libraries and CPUs figures are measured under.

    Args:
        device_kind: ``"cpu"`` or ``"cuda"``; on cuda, the GPUs ``CUDA_VISIBLE_DEVICES`` lets
            this process use, read through NVML without creating a CUDA context.
        package_version: version of the calling package; ``profilers`` cannot import it.

    Returns:
        A frozen Fingerprint; ``fp.key()`` is the short hash caches are keyed by.

    Raises:
        ValueError: ``device_kind`` is neither cpu nor cuda, or cuda is asked for and absent.
    """
    import torch

    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind={device_kind!r} is not one of 'cpu', 'cuda'")
    cpu_model = _cpu_model()
    driver = None
    if device_kind == "cuda":
        # cudaGetDeviceCount underneath: it loads the driver but creates no context.
        if not torch.cuda.is_available():
            raise ValueError("device_kind='cuda' but torch sees no CUDA device")
        device_name, device_count, driver = _cuda_devices()
    else:
        device_name, device_count = cpu_model, 1
    return Fingerprint(
        device_kind=device_kind,
        device_name=device_name,
        device_count=device_count,
        cpu_model=cpu_model,
        threads=machine_cpus(),
        torch_version=str(torch.__version__),
        cuda_version=torch.version.cuda,
        driver_version=driver,
        python_version=platform.python_version(),
        package_version=package_version,
    )


def machine_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which the processes it starts
    inherit (torch's thread count is set per process, and ranks sharing a host set fewer)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_tag(threads: int | None) -> str:
    """What tells a cache's figures of one machine apart by the torch thread count they were
    measured at (a CPU matmul's speed depends on it): ``"@{threads}threads"``, or nothing for
    no count (a GPU figure) or one thread per CPU, so that entries cached when the fingerprint
    itself held the thread count keep their keys where it was the CPU count."""
    return "" if threads is None or threads == machine_cpus() else f"@{threads}threads"


def _cpu_model(cpuinfo: Path = _CPUINFO) -> str:
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == "model name":
                return value.strip()
    except OSError:
        pass  # not Linux, or /proc hidden: fall through to what platform knows
    # ARM Linux has no "model name" line and platform.processor() is often empty there.
    return platform.processor() or platform.machine() or "unknown"


def _cuda_devices() -> tuple[str, int, str | None]:
    """Name, count and driver version of the GPUs this process may use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    found = _nvml_devices(visible)
    names, driver = found if found is not None else (_names_without_nvml(visible), None)
    if not names:
        raise ValueError(f"device_kind='cuda' but no GPU is visible "
                         f"(CUDA_VISIBLE_DEVICES={visible!r})")
    # CUDA and NVML may number a mixed machine's GPUs differently (CUDA_DEVICE_ORDER): the set
    # of names is the same in both.
    return " + ".join(sorted(set(names))), len(names), driver


def _nvml_devices(visible: str | None) -> tuple[list[str], str | None] | None:
    """The visible GPUs' names and the driver version through NVML; None where nvidia-ml-py
    or the driver's NVML library is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        names = [_text(pynvml.nvmlDeviceGetName(h)) for h in _visible_handles(pynvml, visible)]
        try:
            driver: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = None
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass  # nothing left to release
    return names, driver


def _visible_handles(nv: ModuleType, visible: str | None) -> list[Any]:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES admits, read as CUDA reads it (and
    torch.cuda.device_count mirrors): indices or (prefixes of) UUIDs, comma-separated, up to
    the first entry that names no device; a device named twice makes the list empty."""
    count = nv.nvmlDeviceGetCount()
    if visible is None:
        return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids: list[str] | None = None
    seen: dict[str, Any] = {}
    for entry in (e.strip() for e in visible.split(",")):
        handle, key = None, entry
        if entry.startswith("MIG-"):
            try:
                handle = nv.nvmlDeviceGetHandleByUUID(entry)
            except nv.NVMLError:
                handle = None
        elif entry.startswith("GPU-"):
            if uuids is None:
                uuids = [_text(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)))
                         for i in range(count)]
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            if len(matches) == 1:
                key, handle = str(matches[0]), nv.nvmlDeviceGetHandleByIndex(matches[0])
        else:
            digits = re.match(r"\d+", entry)  # like strtoul: "1gpu" is 1; "-1" ends the list
            if digits and int(digits.group()) < count:
                key = str(int(digits.group()))
                handle = nv.nvmlDeviceGetHandleByIndex(int(key))
        if handle is None:
            break
        if key in seen:
            return []
        seen[key] = handle
    return list(seen.values())


def _names_without_nvml(visible: str | None) -> list[str]:
    """The GPUs' names from torch where NVML cannot give them (a container without the
    driver's utility libraries): in this process if it has CUDA up already (a rank), else in
    a child process, asked once per process."""
    import torch

    if torch.cuda.is_initialized():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if visible not in _child_names:
        done = subprocess.run([sys.executable, "-c", _CHILD_CODE], capture_output=True,
                              text=True, timeout=_CHILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise ValueError(f"device_kind='cuda': NVML is unavailable and a child process "
                             f"could not name the GPUs ({last}); install nvidia-ml-py and "
                             f"make the NVIDIA driver's libnvidia-ml.so.1 visible")
        _child_names[visible] = json.loads(done.stdout.strip().splitlines()[-1])
    return list(_child_names[visible])


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)
