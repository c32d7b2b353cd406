"""The kernel tuning cache: the best measured config per (kernel, shape bucket, dtype) on one
device, as Kernel Tuner's cache does it.

One JSON file per device fingerprint; its header names the fingerprint and a cache of
another device is refused rather than silently used. Each entry records the hash of the
kernel's source: a kernel that changed since it was tuned gets no config from the cache (its
entries are stale, reported, and overwritten by the next tuning). Every write replaces the
file atomically, so a crash mid-write leaves the previous cache whole.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path

from profilers.store import atomic_write_text

__all__ = ["CacheMismatch", "TuningCache", "shape_bucket", "source_hash"]

SCHEMA_VERSION = 1


class CacheMismatch(ValueError):
    """A cache file that belongs to another device or schema: one line naming it."""


def source_hash(module: str) -> str:
    """sha256 of the kernel module's source file: what the tuned configs were measured on."""
    mod = importlib.import_module(module)
    path = Path(mod.__file__ or "")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def shape_bucket(shape: dict[str, int]) -> str:
    """Dimensions rounded up to a power of two: nearby shapes share their tuned config,
    as the trainer meets many token counts per run."""
    return ",".join(f"{k}={1 << max(0, math.ceil(math.log2(max(int(v), 1))))}"
                    for k, v in sorted(shape.items()))


class TuningCache:
    """``get``/``put`` tuned configs; ``save`` writes atomically."""

    def __init__(self, path: str | Path, fingerprint_key: str, fingerprint: dict | None = None,
                 entries: dict | None = None) -> None:
        self.path = Path(path)
        self.fingerprint_key = fingerprint_key
        self.fingerprint = fingerprint or {}
        self.entries: dict[str, dict] = entries or {}

    @staticmethod
    def key(kernel: str, bucket: str, dtype: str) -> str:
        return f"{kernel}|{bucket}|{dtype}"

    @classmethod
    def load(cls, path: str | Path, fingerprint_key: str, fingerprint: dict | None = None,
             *, create: bool = True) -> TuningCache:
        """The cache at ``path`` (empty when there is none and ``create``); refused when it
        was tuned on another device."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise CacheMismatch(f"{path}: no tuning cache; run `autotune kernels tune`")
            return cls(path, fingerprint_key, fingerprint)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheMismatch(f"{path}: not a tuning cache ({exc})") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise CacheMismatch(f"{path}: tuning cache schema {data.get('schema_version')}, "
                                f"this autotune reads {SCHEMA_VERSION}; tune again")
        if data.get("fingerprint_key") != fingerprint_key:
            raise CacheMismatch(f"{path}: tuned on device {data.get('fingerprint_key')} "
                                f"({data.get('fingerprint', {}).get('device_name', '?')}), this "
                                f"is {fingerprint_key}; tune here with `autotune kernels tune` "
                                f"or point --cache elsewhere")
        return cls(path, fingerprint_key, data.get("fingerprint"), data.get("entries", {}))

    def get(self, kernel: str, shape: dict[str, int], dtype: str, *, module: str) -> dict | None:
        """The tuned config, or None when untuned or tuned on another version of the kernel."""
        entry = self.entries.get(self.key(kernel, shape_bucket(shape), dtype))
        if entry is None or entry.get("source_hash") != source_hash(module):
            return None
        return dict(entry["config"])

    def stale(self, modules: dict[str, str]) -> list[str]:
        """Keys whose kernel changed since they were tuned (``modules``: kernel -> module)."""
        hashes = {k: source_hash(m) for k, m in modules.items()}
        return [key for key, e in self.entries.items()
                if key.split("|")[0] in hashes and e.get("source_hash") != hashes[key.split("|")[0]]]

    def put(self, kernel: str, shape: dict[str, int], dtype: str, config: dict, *, module: str,
            seconds: float, measured: int) -> None:
        self.entries[self.key(kernel, shape_bucket(shape), dtype)] = {
            "config": dict(config), "seconds": float(seconds), "measured_configs": int(measured),
            "source_hash": source_hash(module), "shape": dict(shape)}

    def save(self) -> Path:
        return atomic_write_text(self.path, json.dumps({
            "schema_version": SCHEMA_VERSION, "fingerprint_key": self.fingerprint_key,
            "fingerprint": self.fingerprint, "entries": dict(sorted(self.entries.items())),
        }, indent=2) + "\n")
