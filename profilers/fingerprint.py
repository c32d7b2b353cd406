"""The environment fingerprint of this process: what a stored figure is only valid for."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

from profilers.records import Fingerprint

__all__ = ["current_fingerprint"]

_CPUINFO = Path("/proc/cpuinfo")


def current_fingerprint(
    device_kind: Literal["cpu", "cuda"] = "cpu", package_version: str = "0"
) -> Fingerprint:
    """Describe the device, drivers, libraries and thread count figures are measured under.

    Args:
        device_kind: ``"cpu"`` or ``"cuda"``; on cuda the name is that of device 0.
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
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device_kind='cuda' but torch sees no CUDA device")
        device_name, device_count = torch.cuda.get_device_name(0), torch.cuda.device_count()
    else:
        device_name, device_count = cpu_model, 1
    return Fingerprint(
        device_kind=device_kind,
        device_name=device_name,
        device_count=device_count,
        cpu_model=cpu_model,
        threads=torch.get_num_threads(),
        torch_version=str(torch.__version__),
        cuda_version=torch.version.cuda,
        driver_version=_driver_version() if device_kind == "cuda" else None,
        python_version=platform.python_version(),
        package_version=package_version,
    )


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


def _driver_version() -> str | None:
    """The NVIDIA driver version through NVML, or None where nvidia-ml-py or NVML is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    # Older nvidia-ml-py releases return bytes.
    return version.decode() if isinstance(version, bytes) else str(version)
