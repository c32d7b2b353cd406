"""Kernel configs at training time: pinned in the RunConfig, else tuned for the shape's
bucket in the tuning cache, else the kernel's default. The trainer builds one chooser at
start-up; a cache of another device is refused there, not discovered mid-run."""

from __future__ import annotations

from pathlib import Path

from kernels.cache import TuningCache

__all__ = ["DEFAULTS", "KernelChooser"]

# Middle-of-the-space configs: sane before any tuning.
DEFAULTS: dict[str, dict[str, int]] = {
    "linear_ce": {"chunk_tokens": 1024},
    "rmsnorm": {"block_rows": 256},
    "attention": {"block_q": 64, "block_k": 64},
    "matmul": {"block_m": 128, "block_n": 128, "block_k": 128},
}
MODULES = {"linear_ce": "kernels.linear_ce", "rmsnorm": "kernels.rmsnorm",
           "attention": "kernels.attention_blocked", "matmul": "kernels.matmul"}


class KernelChooser:
    def __init__(self, dtype: str, pinned: dict[str, dict[str, int]] | None = None,
                 cache: TuningCache | None = None) -> None:
        self.dtype, self.pinned, self.cache = dtype, dict(pinned or {}), cache
        self._memo: dict[tuple, dict] = {}

    @classmethod
    def for_run(cls, kernels, dtype: str, device: str, cache_path: Path | None) -> KernelChooser:  # noqa: ANN001
        """From a RunConfig's ``kernels`` section; ``cache_path`` is this device's default
        cache, used when the section says ``auto`` and the file exists."""
        from autotune import __version__
        from profilers.fingerprint import current_fingerprint

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
            got = self.pinned.get(kernel)
            if got is None and self.cache is not None:
                got = self.cache.get(kernel, shape, self.dtype, module=MODULES[kernel])
            self._memo[key] = dict(got if got is not None else DEFAULTS[kernel])
        return self._memo[key]
