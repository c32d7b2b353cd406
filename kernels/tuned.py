"""Kernel configs at training time: pinned in the RunConfig, else tuned for the shape's
bucket in the tuning cache, else the kernel's default. The trainer builds one chooser at
start-up; a cache of another device is refused there, not discovered mid-run."""

from __future__ import annotations

from pathlib import Path

from kernels.cache import TuningCache
from kernels.registry import KERNELS

__all__ = ["KernelChooser", "activate", "config", "default_cache_path"]


def default_cache_path(device: str = "cpu") -> Path:
    """This device's tuning cache, beside the profilers' caches (``$AUTOTUNE_CACHE_DIR`` or
    ``~/.cache/autotune``), named by the device fingerprint."""
    import os

    from autotune import __version__
    from profilers.fingerprint import current_fingerprint

    root = os.environ.get("AUTOTUNE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "autotune"
    return base / "kernels" / f"{current_fingerprint(device, __version__).key()}.json"


class KernelChooser:
    def __init__(self, dtype: str, pinned: dict[str, dict[str, int]] | None = None,
                 cache: TuningCache | None = None) -> None:
        self.dtype, self.pinned, self.cache = dtype, dict(pinned or {}), cache
        self._memo: dict[tuple, dict] = {}

    @classmethod
    def for_run(cls, kernels, dtype: str, device: str,  # noqa: ANN001 - KernelsConfig
                cache_path: Path | None = None) -> KernelChooser:
        """From a RunConfig's ``kernels`` section; ``cache_path`` (default: this device's
        cache, ``default_cache_path``) is used when the section says ``auto`` and it exists."""
        from autotune import __version__
        from profilers.fingerprint import current_fingerprint

        cache_path = cache_path or default_cache_path(device)
        where = kernels.tuning_cache
        path = None
        if where == "auto":
            path = cache_path if cache_path is not None and cache_path.exists() else None
        elif where != "none":
            path = Path(where)
        cache = None
        if path is not None:
            cache = TuningCache.load(path, current_fingerprint(device, __version__).key(),
                                     create=False)
        return cls(dtype, kernels.configs, cache)

    def config(self, kernel: str, shape: dict[str, int]) -> dict[str, int]:
        key = (kernel, tuple(sorted(shape.items())))
        if key not in self._memo:
            spec = KERNELS[kernel]
            got = self.pinned.get(kernel)
            if got is None and self.cache is not None:
                got = self.cache.get(kernel, shape, self.dtype, module=spec.module)
            self._memo[key] = dict(got if got is not None else spec.default)
        return self._memo[key]


# The chooser of the run in this process: kernels called deep inside the model ask it for
# their config, so the model's modules need not carry it (one run per training process).
_ACTIVE: KernelChooser | None = None


def activate(chooser: KernelChooser | None) -> None:
    global _ACTIVE
    _ACTIVE = chooser


def config(kernel: str, shape: dict[str, int]) -> dict[str, int]:
    """The active run's config for ``kernel`` at ``shape``, else the kernel's default."""
    if _ACTIVE is None:
        return dict(KERNELS[kernel].default)
    return _ACTIVE.config(kernel, shape)
