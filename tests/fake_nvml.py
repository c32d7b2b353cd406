"""A stand-in for nvidia-ml-py's ``pynvml``: what NVML reports on a machine with NVIDIA GPUs,
for tests on machines without one. Install it with ``sys.modules["pynvml"] = fake_nvml.make()``
(or ``monkeypatch.setitem``) before the code under test imports ``pynvml``."""

from __future__ import annotations

import types
from collections.abc import Sequence

__all__ = ["H100", "NVMLError", "make"]

H100 = "NVIDIA H100 80GB HBM3"


class NVMLError(Exception):
    """pynvml.NVMLError: every NVML failure."""


def make(names: Sequence[str] = (H100, H100), *, driver: str | bytes = "550.54.15",
         uuids: Sequence[str] | None = None, fail_init: bool = False) -> types.ModuleType:
    """A fake ``pynvml`` with one device per name (NVML index order); ``calls`` lists what
    was called, so a test can check that every ``nvmlInit`` has its ``nvmlShutdown``."""
    uuids = list(uuids or [f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}" for i in range(len(names))])
    mod = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def handle_by_uuid(uuid: str | bytes) -> int:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        if text not in uuids:
            raise NVMLError("Not Found")
        return uuids.index(text)

    def handle_by_index(index: int) -> int:
        if not 0 <= index < len(names):
            raise NVMLError("Invalid Argument")
        return index

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: driver  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(names)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = handle_by_index  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByUUID = handle_by_uuid  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: names[h]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: uuids[h]  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod
