"""``measure`` through its real child process: each way a trial ends is a recorded status."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from autotune.cli import main
from autotune.config import RunConfig, save_yaml
from autotune.measure import measure
from autotune.train.flops import model_flops
from profilers.records import Measurement, Status

TINY = {
    "workload": {
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64},
        "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128},
        "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4},
    },
    "schedule": {"policy": "chunkflow", "chunk_size": 32, "micro_batch_tokens": 64},
}


def _rc(**budget) -> RunConfig:
    data = json.loads(json.dumps(TINY))
    data["workload"]["budget"].update(budget)
    return RunConfig.model_validate(data)


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Measurement, float, Path]:
    """One healthy trial, with the seconds it took here, whole: start-up included."""
    tmp_path = tmp_path_factory.mktemp("healthy")
    start = time.monotonic()
    m = measure(_rc(), steps=3, warmup=1, workdir=tmp_path)
    return m, time.monotonic() - start, tmp_path


def test_complete_measurement_is_consistent(healthy: tuple[Measurement, float, Path]) -> None:
    m, _, tmp_path = healthy
    assert m.status is Status.COMPLETE, m.reason + m.log_tail
    assert len(m.step_times_s) == 3 and m.step_time_s == float(np.median(m.step_times_s))
    tokens = m.extra["tokens_per_step"] * 3
    assert m.tokens_per_s == pytest.approx(tokens / sum(m.step_times_s), rel=1e-9)
    assert m.extra["padding_fraction"] == 0.0
    assert 0 < m.mfu < 1 and "measured fp32 matmul ceiling" in m.mfu_peak_source
    # Parameters, gradients and AdamW's two moments are live at the peak: at least 4x params.
    dims = _rc().workload.model.resolve()
    assert m.peak_mem_bytes >= 4 * 4 * dims.total_params()
    assert m.peak_rss_bytes > m.peak_mem_bytes
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "config.yaml").is_file()


def test_model_flops_by_hand() -> None:
    dims = _rc().workload.model.resolve()
    # per layer: q,o 32x32 each, k,v 32x16 each, mlp 3 x 32x64; lm head 64x32.
    matmul = 2 * 1024 + 2 * 512 + 3 * 2048 + 2048
    assert dims.matmul_params() == matmul
    lengths = np.array([3, 5])
    expected = 6 * matmul * 8 + 6 * 1 * 32 * (9 + 25)
    assert model_flops(dims, lengths) == expected


def test_memory_cap_becomes_oom(tmp_path: Path) -> None:
    # The Python and torch runtime alone exceed 50 MiB of RSS.
    m = measure(_rc(memory_cap_gb=0.05), steps=1, warmup=0, workdir=tmp_path)
    assert m.status is Status.OOM
    assert "cap" in m.reason


def test_hang_becomes_timeout(healthy: tuple[Measurement, float, Path], tmp_path: Path) -> None:
    """A real hang (the trainer's fault hook stalls rank 0 at its first step), under a limit
    twice what a healthy trial of four steps took here: only the hang can outlast it."""
    done, took_s, _ = healthy
    assert done.status is Status.COMPLETE, done.reason + done.log_tail
    m = measure(_rc(), steps=1, warmup=0, timeout_s=2 * took_s, workdir=tmp_path,
                env={"AUTOTUNE_FAULT": "hang:rank=0:step=1"})
    assert m.status is Status.TIMEOUT, m.reason


def test_measure_cli_json_has_the_contract_keys(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    save_yaml(_rc(), cfg)
    assert main(["measure", str(cfg), "--steps", "2", "--warmup", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("status", "tokens_per_s", "step_time_s", "step_time_iqr_s", "peak_mem_bytes",
                "mfu", "model_tflops_per_step"):
        assert out[key] is not None, key
    assert out["status"] == "COMPLETE"


def test_a_rank_dying_in_teardown_after_the_result_keeps_the_measurement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process tree exits on a signal after rank 0 wrote its measurement: the
    measurement stands, with the crash kept beside it."""
    import autotune.measure as am
    from profilers.isolation import IsolatedRun
    from profilers.records import Measurement

    rc = _rc()
    written = Measurement(status=Status.COMPLETE, tokens_per_s=123.0, step_times_s=[1.0],
                          warmup_steps=1, timed_steps=1)

    def fake(argv: list[str], **kwargs: object) -> IsolatedRun:
        Path(argv[argv.index("--out") + 1]).write_text(written.model_dump_json())
        return IsolatedRun(Status.CRASHED, -6, 1.0, 0, "killed by signal 6 (SIGABRT)", "terminate")

    monkeypatch.setattr(am, "run_isolated", fake)
    m = measure(rc, steps=1, warmup=1, workdir=tmp_path)
    assert m.status is Status.COMPLETE and m.tokens_per_s == 123.0
    assert "SIGABRT" in m.extra["teardown_error"] and m.log_tail == "terminate"


def test_a_config_the_trainer_refuses_is_invalid(tmp_path: Path) -> None:
    """A tuning cache from another device is refused by the trainer at start-up: the trial
    is INVALID with the trainer's reason, not a crash."""
    from kernels.cache import TuningCache

    cache = tmp_path / "foreign.json"
    foreign = TuningCache.load(cache, "another-device")
    foreign.put("linear_ce", {"tokens": 512, "hidden": 32, "vocab": 64}, "fp32",
                {"chunk_tokens": 512}, module="kernels.cache", seconds=1e-3, measured=3)
    foreign.save()
    rc = _rc().model_copy(update={"kernels": _rc().kernels.model_copy(
        update={"tuning_cache": str(cache)})})
    m = measure(rc, steps=1, warmup=0, workdir=tmp_path / "trial")
    assert m.status is Status.INVALID, (m.status, m.reason, m.log_tail)
    assert "another-device" in m.reason
