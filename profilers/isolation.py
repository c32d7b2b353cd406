"""Run a trial command in its own process group under a timeout and a memory cap.

An OOM, a crash or a hang of the child comes back as an IsolatedRun with a Status, never as an
exception: a search must outlive any one trial. Whatever the child started is ended with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from profilers.records import Status

__all__ = ["IsolatedRun", "guarded", "run_isolated"]

_OOM_MARKERS = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "DefaultCPUAllocator: can't allocate memory",
    "MemoryError",
    "not enough memory",
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS failing its workspace allocation when memory is full
)
_TAIL_LINES = 40
_TAIL_BYTES = 64 * 1024
_REASON_CHARS = 300
_REAPER = Path(__file__).with_name("reaper.py")
_GRACE_S = 5.0  # between SIGTERM and SIGKILL: time for NCCL/ranks to exit and flush logs


@dataclass(frozen=True, slots=True)
class IsolatedRun:
    """How an isolated command ended.

    Attributes:
        status: COMPLETE on exit 0, else OOM, TIMEOUT or CRASHED.
        returncode: the exit code, or minus the signal number that ended the child.
        wall_s: from start until the child exited or was judged over its limits.
        peak_rss_bytes: largest RSS summed over the process tree at a poll, or the kernel's
            own peak for the child, whichever is larger.
        reason: one line saying why, empty on COMPLETE.
        log_tail: the last lines this run wrote to the log.
    """

    status: Status
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    reason: str
    log_tail: str


def run_isolated(
    argv: list[str],
    *,
    timeout_s: float,
    mem_cap_bytes: int | None,
    log_path: Path,
    env: dict[str, str] | None = None,
    poll_s: float = 0.05,
) -> IsolatedRun:
    """Run ``argv`` (no shell) in a new session, appending its stdout and stderr to ``log_path``.

    The child's process tree is polled every ``poll_s``: past ``timeout_s`` or with its summed
    RSS over ``mem_cap_bytes`` the whole process group, and every descendant seen, get
    SIGTERM, then SIGKILL after 5 s. Processes the child leaves behind are ended the same way
    when it exits. An interrupt (Ctrl-C) while waiting ends the tree and is re-raised. The
    command runs under ``profilers/reaper.py``, which ends the tree if this process dies
    without doing so (SIGKILL), so a killed driver leaves no trial running.

    Args:
        argv: the command and its arguments.
        timeout_s: wall-clock limit in seconds.
        mem_cap_bytes: RSS limit of the whole tree, or None for none.
        log_path: log file, created if missing, appended to otherwise.
        env: the child's entire environment, as for ``subprocess.Popen``; None inherits ours.
        poll_s: seconds between polls.

    Returns:
        The IsolatedRun; a failure of the child is its status, not an exception.

    Raises:
        ValueError: empty ``argv`` or a non-positive limit.
        OSError: the command could not be started at all (missing executable).

    Example:
        >>> run = run_isolated([sys.executable, "-c", "pass"], timeout_s=10,
        ...                    mem_cap_bytes=None, log_path=Path("/tmp/trial.log"))
        >>> run.status
        <Status.COMPLETE: 'COMPLETE'>
    """
    _check_args(argv, timeout_s, mem_cap_bytes, poll_s)
    _check_executable(argv[0], (env if env is not None else os.environ).get("PATH"))
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        offset = os.fstat(log.fileno()).st_size
        start = time.monotonic()
        proc = subprocess.Popen(
            guarded(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    tree = _ProcessTree(proc.pid)
    try:
        verdict = _watch(
            tree, start=start, timeout_s=timeout_s, mem_cap=mem_cap_bytes, poll_s=poll_s
        )
        wall_s = time.monotonic() - start
    except BaseException:
        tree.terminate()
        _reap(proc)
        raise
    tree.terminate()
    returncode, kernel_peak = _reap(proc)
    tail = _log_tail(log_path, offset)
    # The reason is searched in more than the tail shown: a launcher's own traceback can
    # fill the last lines and push the rank's error out of them.
    status, reason = verdict if verdict is not None else _classify(
        returncode, _log_tail(log_path, offset, lines=None))
    return IsolatedRun(
        status=status,
        returncode=returncode,
        wall_s=wall_s,
        peak_rss_bytes=max(tree.peak_rss, kernel_peak),
        reason=reason,
        log_tail=tail,
    )


def _check_args(argv: list[str], timeout_s: float, mem_cap: int | None, poll_s: float) -> None:
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    if timeout_s <= 0 or poll_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} and poll_s={poll_s} must both be positive")
    if mem_cap is not None and mem_cap <= 0:
        raise ValueError(f"mem_cap_bytes={mem_cap} must be positive or None")


def guarded(argv: list[str]) -> list[str]:
    """``argv`` run under the reaper: it and everything it starts end when this process
    dies, even by SIGKILL, instead of running on as orphans."""
    return [sys.executable, "-I", str(_REAPER), str(os.getpid()), "--", *argv]


def _check_executable(exe: str, path: str | None) -> None:
    # The reaper starts the command, so a missing one would otherwise be only an exit code.
    found = (os.path.isfile(exe) and os.access(exe, os.X_OK)) if os.sep in exe else (
        shutil.which(exe, path=path) is not None)
    if not found:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), exe)


def _watch(
    tree: _ProcessTree, *, start: float, timeout_s: float, mem_cap: int | None, poll_s: float
) -> tuple[Status, str] | None:
    """Poll until the child exits (None) or breaks a limit (the status and reason to report)."""
    while not _exited(tree.pid):
        rss = tree.sample_rss()
        if mem_cap is not None and rss > mem_cap:
            return Status.OOM, f"RSS {_fmt_bytes(rss)} exceeded the {_fmt_bytes(mem_cap)} cap"
        if time.monotonic() - start > timeout_s:
            return Status.TIMEOUT, f"killed after {timeout_s:.1f} s timeout"
        time.sleep(poll_s)
    return None


def _exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie: its pid, and so its process-group id, cannot be
    # reused before we reap it, which keeps the later killpg from hitting a stranger.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Wait for the child; return its exit code and the kernel's peak RSS for it in bytes."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits on it again
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return proc.returncode, usage.ru_maxrss * scale


class _ProcessTree:
    """The child and every descendant seen at any poll.

    Remembering descendants matters because one that called setsid() or outlived its parent
    is no longer in the child's process group or below it, and would survive a killpg.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self._root = psutil.Process(pid)
        self._seen: set[psutil.Process] = set()

    def sample_rss(self) -> int:
        """Summed RSS of the live tree now; also updates ``peak_rss``."""
        self._discover()
        total = _rss(self._root) + sum(_rss(p) for p in self._seen)
        self.peak_rss = max(self.peak_rss, total)
        return total

    def terminate(self) -> None:
        """SIGTERM the group and every descendant seen, then SIGKILL what is left after 5 s."""
        self._discover()
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + _GRACE_S
        while not self._all_gone():
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    def _discover(self) -> None:
        # If the root is gone, the descendants seen earlier are still remembered.
        with contextlib.suppress(psutil.Error):
            self._seen.update(self._root.children(recursive=True))
        self._seen = {p for p in self._seen if p.is_running()}

    def _signal(self, sig: signal.Signals) -> None:
        # Fails when the group is empty, or only a zombie leader is left in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for proc in self._seen:
            # psutil refuses to signal a pid that was reused since we saw it.
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def _all_gone(self) -> bool:
        return _exited(self.pid) and not any(_alive(p) for p in self._seen)


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0  # exited or zombie between listing and reading


def _classify(returncode: int, tail: str) -> tuple[Status, str]:
    """Status and reason of a child that exited on its own."""
    if returncode == 0:
        return Status.COMPLETE, ""
    root = _root_cause_signal(tail)
    if returncode < 0:
        reason = _signal_reason(-returncode)
    elif returncode == 128 + signal.SIGKILL:
        # A shell or launcher reporting that its own child was SIGKILLed.
        reason = f"exit code {returncode} (a child killed by SIGKILL; likely the kernel OOM killer)"
    elif root is not None:
        reason = f"rank {root[0]} {_signal_reason(root[1])}"
    else:
        last = _last_line(tail)
        reason = f"exit code {returncode}: {last}" if last else f"exit code {returncode}"
    oom = (any(marker in tail for marker in _OOM_MARKERS)
           or returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
           or (root is not None and root[1] == signal.SIGKILL))
    return (Status.OOM if oom else Status.CRASHED), reason


def _signal_reason(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    if signum == signal.SIGKILL:
        # We did not send it (that path has its own verdict), and the kernel's OOM killer
        # is by far the most common sender of an unannounced SIGKILL.
        return f"killed by signal {signum} ({name}; likely the kernel OOM killer)"
    return f"killed by signal {signum} ({name})"


# torchrun's failure summary names the rank that failed first; when a signal ended it, the
# other ranks' errors (a peer's connection reset) are consequences, not the cause.
_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)",
    re.DOTALL)


def _root_cause_signal(text: str) -> tuple[int, int] | None:
    """(rank, signal) of the launcher's root-cause rank when a signal ended it."""
    match = _ROOT_CAUSE.search(text)
    if match is None or int(match.group(2)) >= 0:
        return None
    return int(match.group(1)), -int(match.group(2))


# The line that names a failure, in a Python traceback or a torchrun failure summary.
_RANK_ERROR = re.compile(r"\[rank\d+\]: \w*(Error|Exception)\b")
_FAILURE_LINE = re.compile(r"\b\w*(Error|Exception)\b|\bSignal \d+ \(SIG\w+\)")


def _last_line(text: str) -> str:
    """The line that best says why: a rank's own error (``[rank0]: ...Error: ...``), else
    the last one naming an error (other than the launcher's own wrapper error), else the
    last that is not a separator rule."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) - set("=-*")]
    for line in lines:
        if _RANK_ERROR.match(line):
            return line[:_REASON_CHARS]
    for line in reversed(lines):
        if _FAILURE_LINE.search(line) and "ChildFailedError" not in line:
            return line[:_REASON_CHARS]
    return lines[-1][:_REASON_CHARS] if lines else ""


def _log_tail(path: Path, offset: int, lines: int | None = _TAIL_LINES) -> str:
    """The last lines written to ``path`` after ``offset`` (this run's part of the log)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = max(offset, size - _TAIL_BYTES)
        fh.seek(start)
        data = fh.read()
    text = data.decode("utf-8", errors="replace").splitlines()
    if start > offset:
        text = text[1:]  # the read began mid-line
    return "\n".join(text[-lines:] if lines is not None else text)


def _fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"
