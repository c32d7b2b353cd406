from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from profilers.isolation import run_isolated
from profilers.records import Status

MiB = 2**20


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited; a zombie waiting for init to reap it counts as exited."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_exit_zero_is_complete(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "trial.log"
    run = run_isolated(
        _py("print('hello from the trial')"), timeout_s=20, mem_cap_bytes=None, log_path=log
    )
    assert run.status is Status.COMPLETE
    assert run.returncode == 0 and run.reason == ""
    assert run.log_tail == "hello from the trial"
    assert run.peak_rss_bytes > 1 * MiB  # an interpreter is never smaller than this
    assert 0 < run.wall_s < 20


def test_nonzero_exit_is_crashed_with_last_line(tmp_path: Path) -> None:
    code = (
        "import sys; print('loading'); print('bad config: tp=3', file=sys.stderr); print(); "
        "sys.exit(3)"
    )
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.CRASHED
    assert run.returncode == 3
    assert run.reason == "exit code 3: bad config: tp=3"
    assert "loading" in run.log_tail


def test_log_is_appended_and_tail_is_this_run_only(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    run_isolated(_py("print('first run')"), timeout_s=20, mem_cap_bytes=None, log_path=log)
    second = run_isolated(
        _py("import sys; sys.exit(1)"), timeout_s=20, mem_cap_bytes=None, log_path=log
    )
    assert log.read_text() == "first run\n"
    assert second.log_tail == "" and second.reason == "exit code 1"


def test_log_tail_keeps_the_last_40_lines(tmp_path: Path) -> None:
    code = "for i in range(100): print(f'line {i}')"
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.log_tail.splitlines() == [f"line {i}" for i in range(60, 100)]


def test_env_replaces_the_environment(tmp_path: Path) -> None:
    code = "import os; print(os.environ.get('TRIAL_KNOB'), 'HOME' in os.environ)"
    run = run_isolated(
        _py(code),
        timeout_s=20,
        mem_cap_bytes=None,
        log_path=tmp_path / "t.log",
        env={"TRIAL_KNOB": "7"},
    )
    assert run.log_tail == "7 False"


def test_hang_is_timeout_and_child_is_gone(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    start = time.monotonic()
    run = run_isolated(_py(code), timeout_s=1.0, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert time.monotonic() - start < 5
    assert run.status is Status.TIMEOUT
    assert run.reason == "killed after 1.0 s timeout"
    assert run.returncode == -signal.SIGTERM
    assert not psutil.pid_exists(int(pid_file.read_text()))  # reaped, not even a zombie


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "setsid"])
def test_timeout_kills_grandchildren(tmp_path: Path, own_session: bool) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        f"                     start_new_session={own_session})\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    run = run_isolated(_py(code), timeout_s=1.5, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.TIMEOUT
    assert _wait_gone(int(pid_file.read_text()))


def test_processes_left_behind_by_a_finished_child_are_ended(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(0.3)\n"  # long enough for a poll to see the grandchild
    )
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.COMPLETE
    assert _wait_gone(int(pid_file.read_text()))


def test_memory_cap_is_oom_naming_the_cap(tmp_path: Path) -> None:
    # b"x" * n writes every byte, so the pages are resident (bytes(n) would not be).
    code = "import time; block = b'x' * (400 << 20); time.sleep(30)"
    run = run_isolated(
        _py(code), timeout_s=20, mem_cap_bytes=150 * MiB, log_path=tmp_path / "t.log"
    )
    assert run.status is Status.OOM
    assert run.reason.startswith("RSS ") and run.reason.endswith("exceeded the 150.0 MiB cap")
    assert run.peak_rss_bytes > 150 * MiB
    assert run.wall_s < 20  # ended by the cap: before its 30 s sleep and the 20 s timeout


def test_memory_error_in_log_is_oom(tmp_path: Path) -> None:
    code = "import sys; print('Traceback ...'); print('MemoryError'); sys.exit(1)"
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.OOM
    assert run.reason == "exit code 1: MemoryError"


def test_torch_oom_message_is_oom(tmp_path: Path) -> None:
    code = "raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')"
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.OOM
    assert run.reason.startswith("exit code 1: RuntimeError: CUDA out of memory")


def test_unexpected_sigkill_is_oom(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.OOM
    assert run.returncode == -9
    assert "signal 9 (SIGKILL" in run.reason and "OOM killer" in run.reason


def test_other_signal_is_crashed(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    run = run_isolated(_py(code), timeout_s=20, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    assert run.status is Status.CRASHED
    assert run.reason == "killed by signal 11 (SIGSEGV)"


def test_keyboard_interrupt_kills_child_and_propagates(tmp_path: Path) -> None:
    # Python's Ctrl-C handler, which a shell's background job (`cmd &` without job control)
    # starts without: SIGINT is ignored there, and no KeyboardInterrupt would ever come.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    interrupt = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_isolated(_py(code), timeout_s=30, mem_cap_bytes=None, log_path=tmp_path / "t.log")
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, previous)
    assert not psutil.pid_exists(int(pid_file.read_text()))


def test_missing_executable_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_isolated(
            ["/nonexistent/python"], timeout_s=5, mem_cap_bytes=None, log_path=tmp_path / "t.log"
        )


@pytest.mark.parametrize(
    ("argv", "timeout_s", "cap"), [([], 1.0, None), (["true"], 0.0, None), (["true"], 1.0, 0)]
)
def test_bad_arguments_are_refused(
    tmp_path: Path, argv: list[str], timeout_s: float, cap: int | None
) -> None:
    with pytest.raises(ValueError):
        run_isolated(argv, timeout_s=timeout_s, mem_cap_bytes=cap, log_path=tmp_path / "t.log")


def test_a_ranks_own_error_is_the_reason_not_the_launchers() -> None:
    from profilers.isolation import _last_line

    log = "\n".join([
        "[rank0]: Traceback (most recent call last):",
        "[rank0]: RuntimeError: Output 6 of RegisterPostBackwardFunction is a view",
        *[f"  File \"torch/distributed/run.py\", line {i}, in main" for i in range(60)],
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "  traceback : Signal 15 (SIGTERM) received by PID 1",
    ])
    assert _last_line(log) == "[rank0]: RuntimeError: Output 6 of RegisterPostBackwardFunction is a view"


def test_a_driver_killed_by_sigkill_leaves_no_trial_running(tmp_path: Path) -> None:
    """SIGKILL gives the driver no chance to clean up; its reaper must end the trial tree,
    including a grandchild in a session of its own (as torchrun starts its ranks)."""
    pids = tmp_path / "pids"
    trial = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
        "                     start_new_session=True)\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{p.pid}}')\n"
        "time.sleep(600)\n"
    )
    driver = (
        "import sys\n"
        "from pathlib import Path\n"
        "from profilers.isolation import run_isolated\n"
        f"run_isolated([sys.executable, '-c', {trial!r}], timeout_s=600, mem_cap_bytes=None,\n"
        f"             log_path=Path({str(tmp_path / 't.log')!r}))\n"
    )
    proc = subprocess.Popen(_py(driver), start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pids.is_file() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the trial never started"
        time.sleep(0.05)
    trial_pids = [int(p) for p in pids.read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: the trial is in another session
    proc.wait()
    for pid in trial_pids:
        assert _wait_gone(pid, within_s=5.0), f"process {pid} outlived its driver"


ROOT_CAUSE = """[rank1]: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
autotune.train.worker FAILED
------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 4495)  (SIGTERM)
  traceback : Signal 15 (SIGTERM) received by PID 4495
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 4494)  ({name})
  traceback : Signal {sig} ({name}) received by PID 4494
======================================================"""


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGABRT, Status.CRASHED),
                                             (signal.SIGKILL, Status.OOM)])
def test_a_rank_killed_by_a_signal_is_the_reason_not_its_peers_reset(
        sig: signal.Signals, status: Status) -> None:
    """torchrun's log of rank 0 aborting: rank 1's 'connection closed' is a consequence."""
    from profilers.isolation import _classify

    log = ROOT_CAUSE.format(code=-sig, sig=int(sig), name=sig.name)
    got, reason = _classify(1, log)
    assert got is status and reason.startswith(f"rank 0 killed by signal {int(sig)} ({sig.name}")
    # A rank that raised (exit code 1) keeps its own error line as the reason.
    assert _classify(1, log.replace(f"exitcode  : {-sig}", "exitcode  : 1"))[1] == (
        "exit code 1: [rank1]: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer")
