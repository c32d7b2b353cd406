"""`autotune bench`: suites, time to train to a held-out loss target, MLPerf logs checked by
the real compliance checker, olympic-mean scores; bad suites refused with one line.

Bad input covered here: an unknown contender, an unknown workload, zero runs, a workload of
user data (no source to hold data out from), an unknown suite name; an unreachable quality
target is not bad input: its runs stop at the time limit, log ``aborted`` and get no score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from autotune.cli import main
from suites.bench import CONTENDERS, contender_config, load_suite, olympic_mean, score
from suites.mlperf import check_log, parse_log

SMOKE = Path(__file__).parents[2] / "suites" / "defs" / "smoke.yaml"


def _suite(tmp_path: Path, **over: object) -> Path:
    suite = yaml.safe_load(SMOKE.read_text())
    tuned = tmp_path / "tuned.yaml"
    # a config tuned before, so the test does not spend a tuning run
    tuned.write_text(yaml.safe_dump({"schedule": {"policy": "skrull", "micro_batch_tokens": 512}}))
    # a looser target than the smoke suite's: the test needs the mechanics, not the figure
    suite |= {"contenders": ["pack-bfd", "tuned"], "tuned": {"config": "tuned.yaml"},
              "quality_target": {"eval_loss": 5.0}} | over
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_olympic_mean_drops_the_fastest_and_slowest() -> None:
    assert olympic_mean([5.0, 1.0, 3.0, 4.0, 100.0]) == pytest.approx((3 + 4 + 5) / 3)
    assert olympic_mean([2.0, 4.0]) == pytest.approx(3.0)  # under three runs: the plain mean
    assert olympic_mean([1.0, 2.0, math.inf]) == pytest.approx(2.0)  # one miss is dropped
    assert olympic_mean([1.0, math.inf, math.inf]) is None  # two leave no score
    assert olympic_mean([]) is None


def test_score_counts_aborted_runs_as_infinitely_slow() -> None:
    suite, _ = load_suite(str(SMOKE))
    run = lambda t, status="success": {"status": status, "time_to_train_s": t,  # noqa: E731
                                       "tokens_per_s": 10.0, "mfu": None, "energy_j": None}
    s = score(suite, {"pack-bfd": [run(10.0), run(12.0), run(30.0, "aborted")],
                      "tuned": [run(4.0), run(5.0), run(6.0)]})
    c = s["contenders"]
    assert c["pack-bfd"]["olympic_mean_s"] == pytest.approx(12.0)  # 10 and inf dropped
    assert c["pack-bfd"]["successes"] == 2 and c["pack-bfd"]["aborted"] == 1
    assert c["pack-bfd"]["speedup_of_tuned"] == pytest.approx(12.0 / 5.0)
    assert c["tuned"]["speedup_of_tuned"] == pytest.approx(1.0)
    # By hand: a resample keeping the aborted run twice or more scores no olympic mean, the
    # slowest possible (no upper end: None in JSON); one with every run of the tuned at 6 s
    # and pack-bfd's at 10 s gives the least, 10 / 6.
    assert c["pack-bfd"]["speedup_high"] is None
    assert 10.0 / 6.0 <= c["pack-bfd"]["speedup_low"] <= 12.0 / 5.0


def test_every_contender_is_a_valid_config_of_the_workload() -> None:
    suite, _ = load_suite(str(SMOKE))
    for name in CONTENDERS:
        if name != "tuned":
            rc = contender_config(name, suite.workload, seed=3)
            assert rc.seed == 3 and rc.parallel.dp == suite.nproc


@pytest.mark.slow  # 45 s: a whole bench run; its parts have fast tests of their own
def test_bench_runs_to_the_target_and_every_log_passes_the_checker(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    assert main(["bench", str(_suite(tmp_path)), "--out", str(out), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    results = {}
    for name in ("pack-bfd", "tuned"):
        results[name] = []
        for i in (1, 2, 3):
            d = out / "runs" / name / str(i)
            r = json.loads((d / "result.json").read_text())
            assert r["status"] == "success" and r["compliance"]["ok"]
            assert check_log(d / "mlperf.log")[0]  # checked again, independently of the run
            events = parse_log(d / "mlperf.log")
            stop = [e for e in events if e["key"] == "run_stop"][0]
            assert stop["metadata"]["status"] == "success"
            # the last eval the log holds is the one that reached the target
            evals = [e["value"] for e in events if e["key"] == "eval_accuracy"]
            assert evals[-1] <= 5.0 < min(evals[:-1], default=math.inf)
            assert r["eval"][-1]["eval_loss"] == pytest.approx(evals[-1])
            assert [e["metadata"]["samples_count"] for e in events if e["key"] == "eval_accuracy"] \
                == [e["samples"] for e in r["eval"]]
            results[name].append(r["time_to_train_s"])
        # run i of every contender shares seed i + the suite's
        assert [json.loads((out / "runs" / name / str(i) / "result.json").read_text())["seed"]
                for i in (1, 2, 3)] == [1, 2, 3]
        # three runs: the olympic mean is the median run, by hand
        assert scores["contenders"][name]["olympic_mean_s"] == pytest.approx(sorted(results[name])[1])
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("Public ID,Organization")
    for f in ("suite.yaml", "workload.yaml", "fingerprint.json", "lengths.json"):
        assert (out / f).is_file()


def test_unreachable_target_stops_at_the_time_limit_aborted(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    # below the source's entropy floor (about 1.44 nats): no model reaches it
    path = _suite(tmp_path, contenders=["pack-bfd"], runs=1, time_limit_s=3,
                  quality_target={"eval_loss": 0.5})
    out = tmp_path / "bench"
    assert main(["bench", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "runs" / "pack-bfd" / "1" / "result.json").read_text())
    assert r["status"] == "aborted" and "time limit" in r["reason"] and r["compliance"]["ok"]
    assert 3.0 <= r["time_to_train_s"] < 30
    # evaluated once more where it stopped: the reason names the quality it reached
    assert r["eval"][-1]["step"] == r["steps"] and f"{r['eval'][-1]['eval_loss']:.4f}" in r["reason"]
    stop = [e for e in parse_log(out / "runs" / "pack-bfd" / "1" / "mlperf.log")
            if e["key"] == "run_stop"][0]
    assert stop["metadata"]["status"] == "aborted"
    assert json.loads((out / "scores.json").read_text())["contenders"]["pack-bfd"]["olympic_mean_s"] is None
    assert "no score" in printed


def test_a_log_failing_the_checker_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    import suites.mlperf

    monkeypatch.setattr(suites.mlperf, "check_log", lambda path: (False, "ERROR - broken"))
    path = _suite(tmp_path, contenders=["pack-bfd"], runs=1, time_limit_s=2,
                  quality_target={"eval_loss": 0.5})
    assert main(["bench", str(path), "--out", str(tmp_path / "b")]) == 1
    r = json.loads((tmp_path / "b" / "runs" / "pack-bfd" / "1" / "result.json").read_text())
    assert r["status"] == "failed" and "compliance" in r["reason"]
    assert "failed" in capsys.readouterr().err


@pytest.mark.parametrize(("over", "message"), [
    ({"contenders": ["pack-bfd", "megatron-magic"]}, "unknown contender 'megatron-magic'"),
    ({"runs": 0}, "runs"),
    ({"workload": "no-such-workload"}, "'no-such-workload' is neither a preset"),
    ({"workload": {"data": {"path": "lengths.txt"}}}, "data.preset"),
])
def test_bad_suites_are_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              over: dict, message: str) -> None:
    (tmp_path / "lengths.txt").write_text("5\n7\n")
    out = tmp_path / "bench"
    assert main(["bench", str(_suite(tmp_path, **over)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_suite_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "no-such-suite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smoke" in err


@pytest.mark.slow
def test_smoke_suite_logs_all_pass_the_checker(tmp_path: Path) -> None:
    """The real `autotune bench smoke` (tuning included; a few minutes): every log passes."""
    out = tmp_path / "smoke"
    assert main(["bench", "smoke", "--out", str(out)]) == 0
    logs = sorted(out.glob("runs/*/*/mlperf.log"))
    assert len(logs) == 4 * 3
    for log in logs:
        ok, output = check_log(log)
        assert ok, output


@pytest.mark.parametrize(("writes_result", "status"), [(True, "success"), (False, "failed")])
def test_a_rank_dying_in_teardown_after_the_result_keeps_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes_result: bool, status: str) -> None:
    """A process tree that exits non-zero after rank 0 wrote its result and a compliant log
    keeps the run (the crash recorded beside it); without a result the run failed."""
    import suites.bench as bench
    import suites.mlperf
    from profilers.isolation import IsolatedRun
    from profilers.records import Status

    suite, _ = load_suite(str(_suite(tmp_path)))
    rc = contender_config("pack-bfd", suite.workload, seed=1)
    run_dir = tmp_path / "run"

    def fake_run(argv: list[str], **kwargs: object) -> IsolatedRun:
        if writes_result:
            (run_dir / "result.json").write_text(json.dumps(
                {"status": "success", "reason": None, "time_to_train_s": 12.5}))
            (run_dir / "mlperf.log").write_text("")
        return IsolatedRun(Status.CRASHED, -6, 1.0, 0, "signal 6 (SIGABRT)", "terminate called")

    monkeypatch.setattr(bench, "run_isolated", fake_run)
    monkeypatch.setattr(suites.mlperf, "check_log", lambda path: (True, "SUCCESS"))
    r = bench._one_run(suite, rc, run_dir, "pack-bfd", 1)
    assert r["status"] == status and r["contender"] == "pack-bfd" and r["run"] == 1
    if writes_result:
        assert r["time_to_train_s"] == 12.5 and "SIGABRT" in r["teardown_error"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == status
