"""Kernel config spaces: a dict of knob name -> choices, shared by the kernels' CPU and Triton
implementations so a sweep is ``for cfg in configs(SPACE): fn(..., impl=impl, **cfg)``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["configs", "covering_sample", "resolve"]


def configs(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a space, the last knob varying fastest.

    >>> configs({"block_m": [64, 128], "block_n": [32]})
    [{'block_m': 64, 'block_n': 32}, {'block_m': 128, 'block_n': 32}]
    """
    for name, choices in space.items():
        if isinstance(choices, str | bytes) or len(choices) == 0:
            raise ValueError(f"knob {name!r} needs a non-empty sequence of choices, got {choices!r}")
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


def covering_sample(space: Mapping[str, Sequence[Any]], n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct configs of ``space`` in which every choice of every knob appears: each
    pick, from a seeded shuffle of all configs, is the first that shows the most choices not
    yet shown. Small and reproducible, unlike a uniform sample, which at a handful of configs
    tends to miss a choice altogether.
    """
    longest = max(len(choices) for choices in space.values())
    pool = configs(space)
    if not longest <= n <= len(pool):
        raise ValueError(f"n={n} must lie in [{longest}, {len(pool)}] to cover every choice")
    random.Random(seed).shuffle(pool)
    unseen = {(name, value) for name, choices in space.items() for value in choices}
    picked: list[dict[str, Any]] = []
    while len(picked) < n:
        best = max(range(len(pool)), key=lambda i: len(unseen.intersection(pool[i].items())))
        picked.append(pool.pop(best))
        unseen.difference_update(picked[-1].items())
    return picked


def resolve(impl: str, given: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]]
            ) -> dict[str, Any]:
    """The knobs of implementation ``impl``: those ``given`` (``None`` means not given), its
    ``defaults`` for the rest. A knob given to an implementation that has no such knob is
    refused rather than ignored, so a config meant for one backend cannot silently run
    another backend at its defaults.
    """
    if impl not in defaults:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {sorted(defaults)}")
    own = defaults[impl]
    foreign = sorted(k for k, v in given.items() if v is not None and k not in own)
    if foreign:
        raise ValueError(f"{', '.join(foreign)} not a knob of impl={impl!r} (its knobs: {sorted(own)})")
    return {k: own[k] if given.get(k) is None else given[k] for k in own}
