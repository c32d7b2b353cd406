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
        line = s.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """In a log, a new postfix or description waits for the next timed line."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # noqa: ARG002
        super().set_postfix_str(s, refresh=False)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:  # noqa: ARG002
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:  # noqa: ARG002
        super().set_description(desc, refresh=False)


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
    # position 0: a log has no lines to move between, whatever other bars are open
    return _LogBar(iterable, file=_Lines(stream), mininterval=LOG_INTERVAL_S,
                   maxinterval=LOG_INTERVAL_S, miniters=0, ascii=True, ncols=100, position=0,
                   **{k: v for k, v in kw.items() if k not in ("leave", "position")})
