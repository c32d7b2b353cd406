"""Progress output: a bar on a terminal, a few plain lines in a log file."""

from __future__ import annotations

import io

from profilers.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_not_carriage_returns() -> None:
    log = io.StringIO()
    for _ in progress(range(5000), file=log, desc="profiling", unit="window"):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # 5,000 items in well under the 30 s interval: the first refresh and the final state
    assert 1 <= len(lines) <= 3, lines
    assert "profiling" in lines[-1] and "5000/5000" in lines[-1]


def test_a_terminal_gets_a_live_bar() -> None:
    term = _Terminal()
    with progress(total=3, file=term, desc="measuring", mininterval=0) as bar:
        for _ in range(3):
            bar.update()
    assert term.getvalue().count("\r") >= 3 and "3/3" in term.getvalue()


def test_disabled_writes_nothing() -> None:
    log = io.StringIO()
    for _ in progress(range(10), file=log, enabled=False):
        pass
    assert log.getvalue() == ""
