"""`autotune fit` and `autotune predict` end to end on a synthetic profile store and
synthetic measured steps; their refusals are one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autotune.cli import main
from autotune.config import RunConfig
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.store import ProfileStore

GOOD = {
    "workload": {
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64,
                  "max_seq_len": 256},
        "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128, "seed": 0},
        "budget": {"global_batch_tokens": 512},
    },
    "schedule": {"policy": "chunkflow", "chunk_size": 64, "micro_batch_tokens": 64},
}


def _measurements(path: Path) -> Path:
    """Ten configs whose 'measured' step is 1.5x the prior's composition plus 30 ms: what
    the calibration has to find."""
    rcs = [RunConfig.model_validate(GOOD | {"schedule": GOOD["schedule"] | {"micro_batch_tokens": m,
                                                                            "chunk_size": 32}})
           for m in (32, 64, 128, 256, 512)]
    rcs += [rc.model_copy(update={"checkpointing": rc.checkpointing.model_copy(
        update={"policy": "full"})}) for rc in rcs]
    ceil = Ceilings({"fp32": 1e11, "bf16": 1e11}, 2e10)
    comp, _ = StepPredictor(StepModels("fp", "cpu", ceil), warmup=1, steps=2).compose(rcs)
    rows = []
    for rc, composed, tokens in zip(rcs, comp.composed_step_s, comp.tokens_per_step):
        step = 1.5 * composed + 0.03
        m = {"status": "COMPLETE", "tokens_per_s": tokens / step, "step_times_s": [step, step],
             "warmup_steps": 1, "timed_steps": 2, "peak_mem_bytes": 5e6}
        rows.append({"config_json": rc.model_dump_json(), "measurement_json": json.dumps(m)})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_fit_calibrates_and_saves_models(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         gemm_store: ProfileStore) -> None:
    store = gemm_store
    table = _measurements(tmp_path / "m.parquet")
    out = tmp_path / "models"
    assert main(["fit", "--profiles", str(store.root), "--measurements", str(table),
                 "--out", str(out), "--folds", "5"]) == 0
    printed = capsys.readouterr().out
    assert "per-family, calibrated" in printed and "gemm" in printed
    accuracy = json.loads((out / "accuracy.json").read_text())
    linear = next(r for r in accuracy["step"] if r["step model"] == "per-family, calibrated")
    prior = next(r for r in accuracy["step"] if r["step model"] == "per-family, composed")
    assert linear["mape"] < 0.05 < prior["mape"]  # the 1.5x + 30 ms is learned, held out
    models = StepModels.load(out, "fp")
    assert models.calibration == "measured" and models.residual.n_measurements == 10
    assert models.families["gemm"].kind == "learned"


def test_predict_prior_only_json(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no models/ folder here: the prior alone
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(GOOD))
    assert main(["predict", str(cfg), "--json", "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"] == "prior-only"
    assert out["tokens_per_s"] > 0 and out["step_time_s"] > 0 and out["peak_mem_bytes"] > 0
    assert set(out["breakdown"]) >= {"gemm", "attention", "norm", "loss", "optimizer"}
    assert out["step_time_s"] == pytest.approx(sum(out["breakdown"].values()), rel=1e-6)


@pytest.mark.parametrize("models, expected", [
    ("{tmp}/nowhere", "--models {tmp}/nowhere: no such folder"),
    ("{tmp}/other", "fitted on fingerprint fp, this machine is"),
])
def test_predict_refuses_missing_or_foreign_models(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   models: str, expected: str) -> None:
    StepModels("fp", "cpu", Ceilings({"fp32": 1e11}, 2e10)).save(tmp_path / "other")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(GOOD))
    assert main(["predict", str(cfg), "--models", models.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected.format(tmp=tmp_path) in err[0], err


def test_fit_refuses_a_folder_that_is_no_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "--profiles", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no profile store" in err[0]
    assert not (tmp_path / "models").exists()


def test_predicted_memory_grows_with_the_micro_batch() -> None:
    ceil = Ceilings({"fp32": 1e11, "bf16": 1e11}, 2e10)
    rcs = [RunConfig.model_validate(GOOD | {"schedule": {"policy": "pack", "micro_batch_tokens": m}})
           for m in (64, 256)]
    out = StepPredictor(StepModels("fp", "cpu", ceil)).predict_many(rcs)
    assert np.all(np.diff(out.peak_mem_bytes) > 0)
