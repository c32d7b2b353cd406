"""Checkpoints: exact resume on the same layout, elastic resume on another, saves that a kill
cannot half-write, and checkpoints that do not fit the run refused in one line.

Exact: the losses after a resume equal an uninterrupted run's bit for bit (CPU, fp32). Elastic:
within the parity tests' tolerance (tests/train/test_distributed.py, LOSS_RTOL 1e-5 relative),
since another layout sums in another order; the reference is the uninterrupted run on one
process, which every layout matches within that tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_distributed import BASE as PARITY_BASE
from test_distributed import LOSS_RTOL  # another summation order over a few steps

from autotune.cli import main
from autotune.config import RunConfig
from autotune.launch import Launch
from autotune.train import checkpoint
from autotune.train.distributed import ParallelContext
from autotune.train.metrics import read_metrics
from autotune.train.session import TrainOptions, train

SAVE_AT, STEPS = 3, 6
# The parity tests' model and data, with warm-up and cosine: a resume at the wrong step
# would train at the wrong rate.
BASE = PARITY_BASE | {"optimizer": {"warmup_steps": 2, "lr_schedule": "cosine",
                                    "decay_steps": 8, "lr": 3e-3}}


def _cfg(parallel: dict | None = None, **schedule) -> dict:
    cfg = json.loads(json.dumps(BASE))
    parallel = parallel or {}
    world = int(np.prod([parallel.get(k, 1) for k in ("dp", "tp", "pp")]))
    cfg["workload"]["hardware"] = {"devices_per_node": world}
    cfg["schedule"].update(schedule)
    cfg["parallel"] = parallel
    return cfg


def _local(cfg: dict, **opts) -> dict:
    """A run in this process (one rank)."""
    rc = RunConfig.model_validate(cfg)
    summary, _ = train(rc, ParallelContext(device=torch.device("cpu")),
                       TrainOptions(eval_every=0, **opts))
    return summary


def _ranks(cfg: dict, tmp: Path, name: str, **opts) -> dict:
    """A run of ``cfg``'s world through torchrun, as ``autotune train`` launches it."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = RunConfig.model_validate(cfg)
    out = tmp / f"{name}.json"
    argv = Launch.for_config(rc).argv("autotune.train.worker", [
        str(path), "--mode", "train", "--steps", str(opts["steps"]), "--out", str(out),
        "--train-options", TrainOptions(eval_every=0, **opts).to_json()])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference_run() -> tuple[list[float], Any]:
    """The uninterrupted run on one process, saving nothing: its losses and its model."""
    rc = RunConfig.model_validate(_cfg())
    summary, trainer = train(rc, ParallelContext(device=torch.device("cpu")),
                             TrainOptions(steps=STEPS, eval_every=0))
    return summary["losses"], trainer.decoder


@pytest.fixture(scope="module")
def reference(reference_run: tuple[list[float], Any]) -> list[float]:
    return reference_run[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints at step 3 under four layouts: one process, and on 2 ranks FSDP ZeRO 3,
    tensor parallelism and pipeline parallelism (each stage writes its own layers)."""
    tmp = tmp_path_factory.mktemp("saved")
    _local(_cfg(), steps=SAVE_AT, save=tmp / "single")
    out = {"single": tmp / "single"}
    for name, parallel in (("zero3", {"dp": 2, "zero_stage": 3}), ("tp2", {"tp": 2}),
                           ("pp2", {"pp": 2})):
        _ranks(_cfg(parallel), tmp, name, steps=SAVE_AT, save=tmp / name)
        out[name] = tmp / name
    return out


def test_exact_resume_one_process(tmp_path: Path, reference: list[float]) -> None:
    first = _local(_cfg(), steps=SAVE_AT, save=tmp_path / "ck")
    assert first["losses"] == reference[:SAVE_AT]
    rest = _local(_cfg(), steps=STEPS, resume=tmp_path / "ck", save=tmp_path / "ck")
    assert rest["start_step"] == SAVE_AT and rest["final_step"] == STEPS
    assert rest["losses"] == reference[SAVE_AT:]  # bit for bit


def test_exact_resume_two_ranks(tmp_path: Path, saved: dict[str, Path],
                               reference_run: tuple[list[float], Any]) -> None:
    cfg = _cfg({"dp": 2, "zero_stage": 3})
    whole = _ranks(cfg, tmp_path, "whole", steps=STEPS)
    rest = _ranks(cfg, tmp_path, "rest", steps=STEPS, resume=saved["zero3"],
                  export_hf=tmp_path / "hf")
    assert rest["start_step"] == SAVE_AT and rest["notes"] == []
    assert rest["losses"] == whole["losses"][SAVE_AT:]  # bit for bit
    # The shards gathered and exported load in transformers and give the logits of the same
    # run on one process (its weights within the parity tests' 2e-5; fp32 logits to 1e-4).
    transformers = pytest.importorskip("transformers")
    from test_hf_export import _ours

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.eval()(ids[None]).logits[0]
    torch.testing.assert_close(theirs, _ours(reference_run[1], ids), rtol=1e-4, atol=1e-4)


def test_a_refusal_on_two_ranks_is_one_line(tmp_path: Path, saved: dict[str, Path],
                                            capsys: pytest.CaptureFixture) -> None:
    """Damage only the ranks can see (the shard index replaced by as many other bytes): they
    refuse, and the command says so in one line, exit 2."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(saved["zero3"], ck)
    meta = next(ck.glob("step-*")) / ".metadata"
    meta.write_bytes(bytes(len(meta.read_bytes())))
    run = _cli_cfg(tmp_path, _cfg({"dp": 2, "zero_stage": 3}))
    err = _refused(capsys, "train", run, "--steps", str(STEPS), "--resume", str(ck))
    assert "unreadable checkpoint data" in err


ELASTIC = {
    # name: (checkpoint written under, resumed under (parallel, schedule), on 2 ranks?)
    "dp2-to-dp1": ("zero3", ({}, {}), False),
    "dp1-to-dp2": ("single", ({"dp": 2, "zero_stage": 2}, {}), True),
    "zero3-to-ddp": ("zero3", ({"dp": 2, "zero_stage": 0}, {}), True),
    "tp2-to-tp1": ("tp2", ({}, {}), False),
    "pp2-to-pp1": ("pp2", ({}, {}), False),
    "pack-to-chunkflow": ("single", ({}, {"policy": "chunkflow", "chunk_size": 64}), False),
}


@pytest.mark.parametrize("case", list(ELASTIC))
def test_elastic_resume_continues_the_run(case: str, tmp_path: Path, saved: dict[str, Path],
                                          reference: list[float]) -> None:
    source, (parallel, schedule), ranks = ELASTIC[case]
    cfg = _cfg(parallel, **schedule)
    opts = {"steps": STEPS, "resume": saved[source]}
    rest = _ranks(cfg, tmp_path, case, **opts) if ranks else _local(cfg, **opts)
    assert rest["start_step"] == SAVE_AT
    assert rest["notes"]  # the layout change is said
    np.testing.assert_allclose(rest["losses"], reference[SAVE_AT:], rtol=LOSS_RTOL)


def _cli_cfg(tmp: Path, cfg: dict) -> str:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _autotune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ | (env or {}))


def test_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path: Path,
                                                              reference: list[float]) -> None:
    run = _cli_cfg(tmp_path, _cfg())
    ck = tmp_path / "ck"
    args = ("train", run, "--steps", str(STEPS), "--save", str(ck), "--save-every", "3",
            "--eval-every", "0", "--json")
    # SIGABRT once step 6's shards are written, before its record and rename
    proc = _autotune(*args, env={"AUTOTUNE_FAULT": f"crash:step={STEPS}:at=save"})
    assert proc.returncode != 0
    assert (ck / f".tmp-step-{STEPS:08d}").is_dir() and not (ck / f"step-{STEPS:08d}").exists()
    assert checkpoint.find(ck).step == SAVE_AT
    proc = _autotune(*args, "--resume", str(ck))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["start_step"] == SAVE_AT and summary["losses"] == reference[SAVE_AT:]
    assert not (ck / f".tmp-step-{STEPS:08d}").exists()  # the half-written save is gone
    # the killed run logged steps 4-6 before dying; the log holds each step once
    steps = [r["step"] for r in read_metrics(ck) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    logged = [r["loss"] for r in read_metrics(ck) if r["kind"] == "train"]
    assert logged == reference


def _refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def one_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    _local(_cfg(), steps=2, save=tmp_path / "ck")
    return tmp_path / "ck", tmp_path


def test_corrupt_checkpoint_is_refused(one_checkpoint: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture) -> None:
    ck, tmp = one_checkpoint
    run = _cli_cfg(tmp, _cfg())
    step = ck / "step-00000002"
    shard = next(step.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a copy cut short
    assert "has" in _refused(capsys, "train", run, "--steps", "4", "--resume", str(ck))
    shard.write_bytes(data)
    (step / "autotune.json").write_text("{not json")
    assert "corrupt" in _refused(capsys, "train", run, "--steps", "4", "--resume", str(ck))


def test_foreign_checkpoint_is_refused(one_checkpoint: tuple[Path, Path],
                                       capsys: pytest.CaptureFixture) -> None:
    ck, tmp = one_checkpoint
    other_model = _cfg()
    other_model["workload"]["model"]["hidden"] = 128
    err = _refused(capsys, "train", _cli_cfg(tmp, other_model), "--steps", "4", "--resume",
                   str(ck))
    assert "another model" in err and "hidden" in err
    bigger_batch = _cfg()
    bigger_batch["workload"]["budget"]["global_batch_tokens"] = 2048
    run = _cli_cfg(tmp, bigger_batch)
    err = _refused(capsys, "train", run, "--steps", "4", "--resume", str(ck))
    assert "global_batch_tokens" in err and "--force" in err
    # forced, it goes on from the checkpoint and says what it changed
    assert main(["train", run, "--steps", "3", "--resume", str(ck), "--force",
                 "--eval-every", "0", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["start_step"] == 2
    assert "forced: workload.budget.global_batch_tokens 1024 -> 2048" in out.err
    # a bare torch.distributed.checkpoint folder is not ours
    bare = tmp / "bare"
    bare.mkdir()
    (bare / ".metadata").write_bytes(b"x")
    assert "not an autotune checkpoint" in _refused(
        capsys, "train", _cli_cfg(tmp, _cfg()), "--steps", "4", "--resume", str(bare))
    assert "no such" in _refused(capsys, "train", _cli_cfg(tmp, _cfg()), "--steps", "4",
                                 "--resume", str(tmp / "missing"))


def test_eval_metrics_and_export_of_one_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    run = _cli_cfg(tmp_path, _cfg())
    logs, hf = tmp_path / "logs", tmp_path / "hf"
    assert main(["train", run, "--steps", "4", "--eval-every", "2", "--log-dir", str(logs),
                 "--export-hf", str(hf), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in summary["eval"]] == [2, 4]
    records = read_metrics(logs)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert [r["loss"] for r in records if r["kind"] == "eval"] == [
        e["eval_loss"] for e in summary["eval"]]
    o = RunConfig.model_validate(_cfg()).optimizer
    assert [r["lr"] for r in records if r["kind"] == "train"] == [
        o.lr * o.lr_factor(i) for i in range(4)]
    assert _tensorboard_steps(logs, "eval/loss") == [2, 4]
    assert _tensorboard_steps(logs, "train/tokens_per_s") == [1, 2, 3, 4]
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]


def test_a_fresh_run_never_overwrites_another(one_checkpoint: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture) -> None:
    ck, tmp = one_checkpoint
    run = _cli_cfg(tmp, _cfg())
    before = {p: p.stat().st_mtime_ns for p in ck.rglob("*")}
    err = _refused(capsys, "train", run, "--steps", "4", "--save", str(ck))
    assert "holds a checkpoint at step 2" in err and "--resume" in err
    err = _refused(capsys, "train", run, "--steps", "4", "--log-dir", str(ck))
    assert "holds the metrics of another run" in err
    assert {p: p.stat().st_mtime_ns for p in ck.rglob("*")} == before


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    _local(_cfg(), steps=4, save=tmp_path / "ck", save_every=1, keep=2)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == [
        "step-00000003", "step-00000004"]


def test_cosine_schedule_by_hand() -> None:
    from autotune.config._runconfig import OptimizerConfig

    o = OptimizerConfig(lr=1.0, warmup_steps=2, lr_schedule="cosine", decay_steps=10,
                        min_lr_ratio=0.1)
    # warm-up (i+1)/2; then 0.1 + 0.9 * (1 + cos(pi * (i - 2) / 8)) / 2, held at 0.1 after
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + np.cos(np.pi / 8)), 0.1 + 0.45 * (1 + 0),
                ]
    got = [o.lr_factor(i) for i in (0, 1, 2, 3, 6)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert o.lr_factor(10) == pytest.approx(0.1) and o.lr_factor(50) == pytest.approx(0.1)
    assert OptimizerConfig(warmup_steps=4).lr_factor(1) == 0.5  # constant after warm-up
    assert OptimizerConfig(warmup_steps=4).lr_factor(9) == 1.0


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _kill_and_resume(run: str, ck: Path, steps: int, save_every: int, kills: int,
                     seed: int) -> tuple[dict, list[int]]:
    """``autotune train`` SIGKILLed at ``kills`` random steps, each time started again with
    ``--resume``, then left to finish. Returns the last run's summary and the kill steps."""
    import signal
    import time

    rng = np.random.default_rng(seed)
    args = [sys.executable, "-m", "autotune", "train", run, "--steps", str(steps), "--save",
            str(ck), "--save-every", str(save_every), "--eval-every", "0", "--json"]
    killed_at = []
    for k in range(kills + 1):
        resume = ["--resume", str(ck)] if k else []
        proc = subprocess.Popen(args + resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if k == kills:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-2000:]
            return json.loads(out), killed_at
        start = checkpoint.find(ck).step if k and checkpoint.find(ck) else 0
        target = int(rng.integers(start + 1, steps))  # a step this run trains, not its last
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = [r["step"] for r in read_metrics(ck) if r["kind"] == "train"]
            if done and done[-1] >= target:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed_at.append(max([r["step"] for r in read_metrics(ck) if r["kind"] == "train"],
                             default=0))
    raise AssertionError("unreachable")


def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_run(
        tmp_path: Path, reference: list[float]) -> None:
    cfg = _cfg()
    cfg["optimizer"]["decay_steps"] = 12
    run = _cli_cfg(tmp_path, cfg)
    whole = _local(cfg, steps=12)
    final, killed = _kill_and_resume(run, tmp_path / "ck", steps=12, save_every=3, kills=3,
                                     seed=0)
    assert len(killed) == 3
    assert final["final_step"] == 12 and final["final_loss"] == whole["final_loss"]
    records = [r for r in read_metrics(tmp_path / "ck") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 13))  # none lost, none twice
    assert [r["loss"] for r in records] == whole["losses"]
    assert _tensorboard_steps(tmp_path / "ck", "train/loss") == list(range(1, 13))


@pytest.mark.slow
def test_acceptance_example_killed_five_times(tmp_path: Path) -> None:
    """The issue's own command: examples/chunkflow.yaml, 40 steps, a checkpoint every 10,
    SIGKILL at five random steps. About 3 minutes on 2 cores."""
    run = str(Path(__file__).parents[2] / "examples" / "chunkflow.yaml")
    proc = _autotune("train", run, "--steps", "40", "--save", str(tmp_path / "whole"),
                     "--save-every", "10", "--eval-every", "0", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole = json.loads(proc.stdout)
    final, killed = _kill_and_resume(run, tmp_path / "ck", steps=40, save_every=10, kills=5,
                                     seed=int.from_bytes(os.urandom(2), "little"))
    print(f"killed after steps {killed}; final loss {final['final_loss']!r}, "
          f"uninterrupted {whole['final_loss']!r}")
    assert final["final_loss"] == whole["final_loss"]  # bit for bit
    records = [r for r in read_metrics(tmp_path / "ck") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert [r["loss"] for r in records] == whole["losses"]


def _signal_after(args: list[str], ck: Path, step: int, signum: int
                  ) -> subprocess.CompletedProcess:
    """``autotune train ARGS`` sent ``signum`` once its metrics show ``step``."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "autotune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if [r for r in read_metrics(ck) if r["kind"] == "train" and r["step"] >= step]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_saves_and_stops_then_resume_continues(ranks: int, tmp_path: Path) -> None:
    """A preemption notice: the run finishes its step, saves it and exits 128 + 15; the
    checkpoint resumes as any other (bit for bit on one process, within the parity
    tolerance against one process on two ranks)."""
    import signal

    import psutil

    cfg = _cfg({"dp": 2, "zero_stage": 2} if ranks == 2 else {})
    run, ck = _cli_cfg(tmp_path, cfg), tmp_path / "ck"
    before = {p.pid for p in psutil.process_iter()}
    proc = _signal_after(["train", run, "--steps", "500", "--save", str(ck), "--eval-every",
                          "0", "--json"], ck, step=4, signum=signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM after step" in proc.stderr and "--resume" in proc.stderr
    stopped = json.loads(proc.stdout)["final_step"]
    assert 4 <= stopped < 500 and checkpoint.find(ck).step == stopped
    assert [r["step"] for r in read_metrics(ck)] == list(range(1, stopped + 1))
    leftover = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                and "autotune.train.worker" in " ".join(p.info["cmdline"] or [])]
    assert not leftover  # no rank outlives the command
    rest = _autotune("train", run, "--steps", str(stopped + 2), "--save", str(ck), "--resume",
                     str(ck), "--eval-every", "0", "--json")
    assert rest.returncode == 0, rest.stderr[-2000:]
    losses = json.loads(rest.stdout)["losses"]
    ref = _local(_cfg(), steps=stopped + 2)["losses"][stopped:]
    if ranks == 1:
        assert losses == ref
    else:
        np.testing.assert_allclose(losses, ref, rtol=LOSS_RTOL)
