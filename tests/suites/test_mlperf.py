"""BenchLog writes MLPerf logs that the package's real compliance checker accepts under the
project's rules, and the rules reject the logs they should."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlperf_logging import mllog

from suites.mlperf import RULES, BenchLog, check_log, parse_log

GBS = 8


def start_run(path: Path) -> BenchLog:
    """A BenchLog that has logged everything up to the first block."""
    log = BenchLog(path, benchmark="autotune-smoke")
    log.submission(platform="2-core-cpu")
    log.init_start()
    log.init_stop()
    log.run_start()
    log.hyperparameters(
        global_batch_size=GBS,
        gradient_accumulation_steps=2,
        seed=7,
        learning_rate=3e-4,
        max_sequence_length=512,
        extra={"packing": "bfd"},
    )
    log.train_samples(1000)
    log.eval_samples(100)
    return log


def write_run(path: Path, *, status: str = "success") -> None:
    log = start_run(path)
    for block in range(3):
        log.block_start(samples_count=block * GBS)
        log.block_stop(samples_count=(block + 1) * GBS)
        log.eval_start(samples_count=(block + 1) * GBS)
        log.eval_accuracy(3.0 - 0.5 * block, samples_count=(block + 1) * GBS)
        log.eval_stop(samples_count=(block + 1) * GBS)
    log.run_stop(status=status, samples_count=3 * GBS)


@pytest.mark.parametrize("status", ["success", "aborted"])
def test_complete_run_passes_checker(tmp_path: Path, status: str) -> None:
    path = tmp_path / "run.log"
    write_run(path, status=status)
    passed, output = check_log(path)
    assert passed, output
    assert str(RULES) in output
    assert parse_log(path)[-1]["metadata"]["status"] == status


def test_run_aborted_inside_first_block_passes(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = start_run(path)
    log.block_start(samples_count=0)
    log.run_stop(status="aborted", samples_count=GBS)
    passed, output = check_log(path)
    assert passed, output


def test_check_runs_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.log"
    write_run(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert check_log(path)[0]
    assert list(elsewhere.iterdir()) == []  # no compliance_checker.log left behind


def _record(key: str, value: object, metadata: dict) -> dict:
    event = "INTERVAL_START" if key.endswith("_start") else "POINT_IN_TIME"
    return {
        "namespace": "",
        "time_ms": 0,
        "event_type": event,
        "key": key,
        "value": value,
        "metadata": metadata,
    }


def _edit(records: list[dict], key: str, change: Callable[[dict], dict | None]) -> list[dict]:
    """Apply ``change`` to the first record with ``key`` (None drops it)."""
    i = next(i for i, r in enumerate(records) if r["key"] == key)
    changed = change(records[i])
    return records[:i] + ([changed] if changed is not None else []) + records[i + 1 :]


def _without_samples_count(r: dict) -> dict:
    return {**r, "metadata": {k: v for k, v in r["metadata"].items() if k != "samples_count"}}


def _with(r: dict, **fields: object) -> dict:
    return {**r, **fields}


BROKEN: dict[str, tuple[Callable[[list[dict]], list[str]], str]] = {
    "run_stop missing": (
        lambda rs: _lines(_edit(rs, "run_stop", lambda r: None)),
        "Required EXACTLY_ONE occurrence of 'run_stop' but found 0",
    ),
    "eval_accuracy without samples_count": (
        lambda rs: _lines(_edit(rs, "eval_accuracy", _without_samples_count)),
        "failed test: 'samples_count' in v['metadata']",
    ),
    "benchmark not autotune-": (
        lambda rs: _lines(_edit(rs, "submission_benchmark", lambda r: _with(r, value="llama31_8b"))),
        "CHECK for 'submission_benchmark' failed",
    ),
    "line not JSON": (
        lambda rs: _lines(rs)[:5] + [':::MLLOG {"key": "seed", "value": 7'] + _lines(rs)[5:],
        "Log lines had parsing errors.",
    ),
    "run_stop status unknown": (
        lambda rs: _lines(_edit(rs, "run_stop", lambda r: _with(r, metadata={"status": "failed"}))),
        "CHECK for 'run_stop' failed",
    ),
    "every line twice (two handlers on one file)": (
        lambda rs: [line for line in _lines(rs) for _ in range(2)],
        "Required EXACTLY_ONE occurrence of 'run_start' but found 2",
    ),
    "success without eval_accuracy": (
        lambda rs: _lines([r for r in rs if r["key"] != "eval_accuracy"]),
        "failed test: s['status'] != 'success'",
    ),
    "eval samples_count going back": (
        lambda rs: _lines(rs[:-2] + [_record("eval_accuracy", 1.0, {"samples_count": 0})] + rs[-1:]),
        "failed test: v['metadata'].get('samples_count', s['last_eval_samples']) >=",
    ),
}


def _lines(records: list[dict]) -> list[str]:
    return [f":::MLLOG {json.dumps(r)}" for r in records]


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_log_fails_checker(tmp_path: Path, case: str) -> None:
    good = tmp_path / "good.log"
    write_run(good)
    breaker, reason = BROKEN[case]
    bad = tmp_path / "bad.log"
    bad.write_text("\n".join(breaker(parse_log(good))) + "\n")
    passed, output = check_log(bad)
    assert not passed, output
    assert reason in output


def test_two_logs_in_one_process_each_get_their_own_lines_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared_handlers = list(mllog.get_mllogger().logger.handlers)
    a = BenchLog(tmp_path / "a.log", benchmark="autotune-a")
    b = BenchLog(tmp_path / "b.log", benchmark="autotune-b")
    a.submission(platform="pa")
    b.submission(platform="pb")
    a.train_samples(11)
    b.train_samples(22)
    a.run_stop(status="success", samples_count=1)
    b.run_stop(status="aborted", samples_count=2)

    def summary(path: Path) -> list[tuple[str, object]]:
        return [(r["key"], r["value"]) for r in parse_log(path)]

    submission = [
        "submission_benchmark",
        "submission_org",
        "submission_division",
        "submission_status",
        "submission_platform",
    ]
    assert summary(tmp_path / "a.log") == list(
        zip(submission, ["autotune-a", "autotune", "open", "onprem", "pa"])
    ) + [("train_samples", 11), ("run_stop", None)]
    assert summary(tmp_path / "b.log") == list(
        zip(submission, ["autotune-b", "autotune", "open", "onprem", "pb"])
    ) + [("train_samples", 22), ("run_stop", None)]
    assert capsys.readouterr().out == ""  # nothing echoed to stdout
    assert mllog.get_mllogger().logger.handlers == shared_handlers


def test_reopening_a_path_starts_the_file_over(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    first = BenchLog(path, benchmark="autotune-smoke")
    first.train_samples(1)
    second = BenchLog(path, benchmark="autotune-smoke")
    second.train_samples(2)
    with pytest.raises(ValueError, match="closed"):
        first.train_samples(3)
    second.eval_samples(4)
    assert [(r["key"], r["value"]) for r in parse_log(path)] == [("train_samples", 2), ("eval_samples", 4)]


def test_logging_after_run_stop_raises(tmp_path: Path) -> None:
    log = BenchLog(tmp_path / "run.log", benchmark="autotune-smoke")
    log.run_stop(status="success", samples_count=0)
    with pytest.raises(ValueError, match="closed"):
        log.eval_accuracy(1.0, samples_count=0)


def test_lines_name_the_callers_site(tmp_path: Path) -> None:
    log = BenchLog(tmp_path / "run.log", benchmark="autotune-smoke")
    log.hyperparameters(global_batch_size=GBS, gradient_accumulation_steps=1, seed=0, learning_rate=1.0)
    records = parse_log(tmp_path / "run.log")
    assert {r["metadata"]["file"] for r in records} == {__file__}
    assert {r["key"]: r["value"] for r in records} == {
        "global_batch_size": GBS,
        "gradient_accumulation_steps": 1,
        "seed": 0,
        "opt_base_learning_rate": 1.0,
        "tensor_parallelism": 1,
        "pipeline_parallelism": 1,
        "context_parallelism": 1,
    }


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = BenchLog(path, benchmark="autotune-smoke", rank0=False)
    log.submission(platform="cpu")
    log.init_start()
    log.run_stop(status="success", samples_count=0)
    log.eval_accuracy(1.0, samples_count=0)  # a no-op object stays a no-op
    assert not path.exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: BenchLog(p, benchmark="smoke"), "benchmark='smoke' does not start with 'autotune-'"),
        (
            lambda p: BenchLog(p, benchmark="autotune-x").run_stop(status="done", samples_count=0),
            "status='done'",
        ),
        (
            lambda p: BenchLog(p, benchmark="autotune-x").hyperparameters(
                global_batch_size=1,
                gradient_accumulation_steps=1,
                seed=0,
                learning_rate=1.0,
                extra={"seed": 1},
            ),
            r"\['seed'\]",
        ),
    ],
    ids=["benchmark prefix", "run_stop status", "extra clash"],
)
def test_refuses_bad_arguments(tmp_path: Path, call: Callable[[Path], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "run.log")


def test_parse_log_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    path.write_text('not a record\n:::MLLOG {"key": "seed"}\n:::MLLOG {oops\n')
    with pytest.raises(ValueError, match=r"run\.log:3: not an MLLOG record"):
        parse_log(path)
