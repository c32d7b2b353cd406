"""Input-aware activation checkpointing (Mimose): per micro-batch, the fewest checkpointed
layers that keep the predicted peak under a memory budget.

The memory of a layer that keeps its activations grows with the micro-batch's tokens (and,
where the attention kernel keeps score-sized buffers, with the sum of squared segment
lengths); a checkpointed layer keeps only its input. The per-layer model is fitted online:
while the last layer runs without checkpointing, a saved-tensor hook counts the bytes it
saves for backward, against the micro-batch's tokens and pairs. The first ``probes``
micro-batches run with every layer but the last checkpointed (safe and still informative);
after that the fit is frozen and plans are cached per (tokens, pairs) bucket, so planning
costs a dict lookup.

    predicted(c) = state + (L - c) * layer(T, P) + c * T * hidden * e   # kept / saved inputs
                   + [c > 0] * layer(T, P)                                # one recomputed layer
                   + logits(T)                                            # lm head and its grad
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from autotune.config import ModelDims
from autotune.data import MicroBatch

__all__ = ["AdaptiveCheckpointing"]

log = logging.getLogger(__name__)


class AdaptiveCheckpointing:
    def __init__(self, dims: ModelDims, *, budget_bytes: float, state_bytes: float,
                 act_bytes: int, probes: int = 4, bucket_tokens: int = 64) -> None:
        self.dims = dims
        self.budget = float(budget_bytes)
        self.state = float(state_bytes)
        self.act_bytes = act_bytes
        self.probes = probes
        self.bucket = bucket_tokens
        self.samples: list[tuple[float, float, float]] = []  # (tokens, pairs, layer bytes)
        self.coef: tuple[float, float] | None = None  # bytes per token, per pair
        self._cache: dict[tuple[int, int], int] = {}
        self._over_budget_warned = False
        self.plans: list[int] = []  # checkpointed layers chosen, per micro-batch

    @staticmethod
    def _size(mb: MicroBatch) -> tuple[float, float]:
        return float(mb.tokens), float(mb.attention_pairs)

    def layer_bytes(self, tokens: float, pairs: float) -> float:
        a, b = self.coef or (0.0, 0.0)
        return a * tokens + b * pairs

    def predicted_peak(self, tokens: float, pairs: float, ckpt: int) -> float:
        layers = self.dims.layers
        layer = self.layer_bytes(tokens, pairs)
        return (self.state + (layers - ckpt) * layer
                + ckpt * tokens * self.dims.hidden * self.act_bytes
                + (layer if ckpt else 0.0) + tokens * self.dims.vocab * 4 * 2)

    def layers_for(self, mb: MicroBatch, *, probe: bool = True) -> int:
        """Checkpointed layers for this micro-batch; before the fit, every layer but the
        last when it is a probe, every layer otherwise."""
        layers = self.dims.layers
        if self.coef is None:
            ckpt = layers - 1 if probe else layers
        else:
            tokens, pairs = self._size(mb)
            key = (math.ceil(tokens / self.bucket), math.ceil(math.sqrt(pairs) / self.bucket))
            if key not in self._cache:
                # price the bucket's upper edge so every member fits
                t, p = key[0] * self.bucket, (key[1] * self.bucket) ** 2
                self._cache[key] = next((c for c in range(layers + 1)
                                         if self.predicted_peak(t, p, c) <= self.budget), layers)
                if self.predicted_peak(t, p, self._cache[key]) > self.budget and not self._over_budget_warned:
                    log.warning("a micro-batch of %d tokens is predicted above the %.2f GB "
                                "budget even with every layer checkpointed", t, self.budget / 1e9)
                    self._over_budget_warned = True
            ckpt = self._cache[key]
        self.plans.append(ckpt)
        return ckpt

    def _fit(self) -> None:
        from scipy.optimize import nnls

        s = np.array(self.samples)
        scale = s[:, 2]
        (a, b), _ = nnls(s[:, :2] / scale[:, None], np.ones(len(s)))
        self.coef = (float(a), float(b))
        self._cache.clear()
        log.info("adaptive checkpointing: %.0f bytes per token and %.2f per attention pair per "
                 "layer, from %d micro-batches", a, b, len(s))

    @contextlib.contextmanager
    def observe(self, model: torch.nn.Module, mb: MicroBatch, ckpt: int) -> Iterator[None]:
        """Around a forward during probing: count the bytes the last layer saves for
        backward (each storage once)."""
        layers = getattr(model, "layers", None)
        if self.coef is not None or layers is None or ckpt >= self.dims.layers:
            yield
            return
        last = list(layers.values())[-1]
        seen: set[int] = set()
        total = [0]
        inside = [False]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if inside[0]:
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total[0] += storage.nbytes()
            return t

        def pre(*_: object) -> None:
            inside[0] = True

        def post(*_: object) -> None:
            inside[0] = False

        handles = [last.register_forward_pre_hook(pre), last.register_forward_hook(post)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()
        tokens, pairs = self._size(mb)
        if total[0]:
            self.samples.append((tokens, pairs, float(total[0])))
        if len(self.samples) >= self.probes:
            self._fit()
