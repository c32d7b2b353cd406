"""Tensor-level peak memory on any device, for devices whose allocator keeps no statistics.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator has no such counter, and a
process's RSS mixes tensors with the runtime and the C allocator's caching. This tracker
counts the bytes of every tensor storage alive: those present when it starts (parameters,
gradients, optimizer state) plus every storage an operator creates while it is active,
released when the storage is freed. It costs Python work per operator, so it runs on a
replayed step, never on a timed one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker:
    """Context manager: ``peak_bytes`` is the most tensor bytes alive at once inside it.

    Example:
        >>> import torch
        >>> with TensorMemoryTracker(existing=[]) as mt:
        ...     a = torch.empty(1000)
        ...     b = torch.empty(1000)
        ...     del a, b
        >>> mt.peak_bytes
        8000
    """

    def __init__(self, *, existing: Iterable[Any] = ()):
        self._existing = list(existing)
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._mode: Any = None

    def _track(self, tensor: Any) -> None:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        # A DTensor (or another wrapper subclass) owns no storage: its local tensors do.
        if is_traceable_wrapper_subclass(tensor):
            attrs, _ = tensor.__tensor_flatten__()
            for attr in attrs:
                inner = getattr(tensor, attr)
                if hasattr(inner, "untyped_storage"):
                    self._track(inner)
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.data_ptr() else id(storage)
        if key in self._live or storage.nbytes() == 0:
            return
        size = int(storage.nbytes())
        self._live[key] = size
        self.current_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        size = self._live.pop(key, 0)
        self.current_bytes -= size

    def __enter__(self) -> TensorMemoryTracker:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_map_only

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                tree_map_only(torch.Tensor, tracker._track, out)
                return out

        for t in self._existing:
            self._track(t)
        self.baseline_bytes = self.current_bytes
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
