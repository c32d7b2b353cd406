"""The first process of every isolated trial: it runs the trial's command and takes the
whole tree down with it when the process that started it dies.

A trial runs in its own session so that it can be killed as a group, which also means it
outlives a driver killed with SIGKILL (nothing in the driver runs then); torchrun puts each
rank in a session of its own too. This process, started by ``run_isolated`` as a plain
script (``python reaper.py PARENT_PID -- ARGV...``, standard library and psutil only, so it
starts in milliseconds), watches its parent: once the parent is gone it SIGKILLs every
descendant. As the Linux child subreaper of the tree it also adopts descendants whose own
parent died, so none of them escapes. Otherwise it is transparent: the trial's exit code is
its exit code, and a trial killed by a signal kills it with the same signal.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.1


def _become_subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # without it a grandchild whose parent died is only found if seen before


def _kill_tree() -> None:
    import psutil

    me = psutil.Process()
    for proc in me.children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass
    os._exit(128 + signal.SIGKILL)


def _die_like(status: int) -> None:
    """Exit as the trial did: with its code, or by the signal that killed it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the trial's core, not ours
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)  # a stopping signal may need a moment to land
    os._exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 1)


def main(argv: list[str]) -> None:
    parent, sep, command = argv[0], argv[1], argv[2:]
    if sep != "--" or not command:
        sys.exit("usage: reaper.py PARENT_PID -- COMMAND [ARGS...]")
    parent_pid = int(parent)
    _become_subreaper()
    # run_isolated signals the whole group, this process included; the trial gets the
    # same signal and decides, and this process follows it out. A handler (not SIG_IGN)
    # because an ignored signal would stay ignored in the trial across exec.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    if os.getppid() != parent_pid:
        sys.exit(128 + signal.SIGKILL)  # the driver died before we were watching
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"cannot start {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        sys.exit(127)
    while True:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            _die_like(status)
        if os.getppid() != parent_pid:
            _kill_tree()
        time.sleep(_POLL_S)


if __name__ == "__main__":
    main(sys.argv[1:])
