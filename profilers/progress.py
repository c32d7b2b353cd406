"""Progress bars that fit where they go: a live bar on a terminal; in a log file
(``autotune profile ... > log 2>&1``), one plain line every ``LOG_INTERVAL_S`` seconds
instead of a carriage-return update per item."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_S", "progress"]

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream that turns tqdm's in-place refreshes into one finished line each."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, enabled: bool = True, file: TextIO | None = None,
             **kw: Any) -> tqdm:
    """``tqdm(iterable, **kw)`` on stderr (or ``file``): a bar on a terminal, timed lines
    elsewhere; nothing where ``enabled`` is false (ranks other than 0, quiet callers)."""
    stream = file or sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kw)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, file=stream, **kw)
    # tqdm's own throttle: at most one refresh per interval, whatever the item rate
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL_S,
                maxinterval=LOG_INTERVAL_S, miniters=0, ascii=True, ncols=100,
                **{k: v for k, v in kw.items() if k != "leave"})
