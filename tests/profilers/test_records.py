from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from profilers.records import Fingerprint, Measurement, Status


def test_status_values_are_their_names() -> None:
    assert [s.value for s in Status] == ["COMPLETE", "OOM", "TIMEOUT", "CRASHED", "INVALID"]
    assert Status("OOM") is Status.OOM


def test_measurement_round_trips_through_json(fingerprint: Fingerprint) -> None:
    m = Measurement(
        status=Status.COMPLETE,
        tokens_per_s=1234.5,
        step_time_s=0.2,
        step_time_iqr_s=0.01,
        step_times_s=[0.19, 0.2, 0.21],
        warmup_steps=2,
        timed_steps=3,
        peak_rss_bytes=2**30,
        mfu=0.41,
        mfu_peak_source="measured bf16 matmul ceiling, ceilings.json",
        canary_s=3e-4,
        canary_ref_s=2.5e-4,
        extra={"tp": 2, "policy": "pack", "lens": [1, 2], "none": None, "ratio": 0.5},
        fingerprint=fingerprint,
    )
    d = m.to_json_dict()
    assert d["status"] == "COMPLETE"
    assert d["fingerprint"]["threads"] == 4
    back = Measurement.model_validate(json.loads(json.dumps(d)))
    assert back == m
    assert type(back.extra["tp"]) is int  # an int knob must not come back as a float
    assert Measurement.model_validate_json(m.model_dump_json()) == m


def test_failed_measurement_needs_only_status_and_reason() -> None:
    m = Measurement.model_validate({"status": "OOM", "reason": "RSS 9.1 GiB over the 8.0 GiB cap"})
    assert m.status is Status.OOM
    assert m.step_times_s == [] and m.step_time_s is None and m.fingerprint is None


@pytest.mark.parametrize(
    "bad",
    [
        {"status": "COMPLETE", "tokens_per_sec": 1.0},
        {"status": "DONE"},
        {"status": "OOM", "timed_steps": -1},
    ],
)
def test_measurement_refuses_bad_fields(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Measurement.model_validate(bad)


@pytest.mark.parametrize(("canary_s", "canary_ref_s", "drift"), [
    (3e-4, 2e-4, 1.5), (1e-4, 2e-4, 0.5), (None, 2e-4, 1.0), (3e-4, None, 1.0), (None, None, 1.0)])
def test_drift_is_the_canary_against_its_reference(canary_s: float | None,
                                                   canary_ref_s: float | None,
                                                   drift: float) -> None:
    m = Measurement(status=Status.COMPLETE, canary_s=canary_s, canary_ref_s=canary_ref_s)
    assert m.drift == pytest.approx(drift)


RESULTS = Path(__file__).parents[2] / "results"


def _stored_records() -> list[dict]:
    """A measurement table row and a metrics.json, both written while the canary lived in
    ``extra``."""
    table = pd.read_parquet(RESULTS / "step_dataset_canary" / "measurements.parquet")
    row = next(j for j in table.measurement_json if "canary_s" in json.loads(j)["extra"])
    metrics = next(RESULTS.glob("bench/*/tuned/trials/*/metrics.json")).read_text()
    return [json.loads(row), json.loads(metrics)]


@pytest.mark.parametrize("stored", _stored_records(), ids=["parquet-row", "metrics.json"])
def test_a_stored_record_keeps_its_canary_in_the_typed_fields(stored: dict) -> None:
    m = Measurement.model_validate_json(json.dumps(stored))
    old_extra = stored["extra"]
    assert (m.canary_s, m.canary_ref_s) == (old_extra["canary_s"], old_extra["canary_ref_s"])
    assert m.drift == old_extra["canary_s"] / old_extra["canary_ref_s"]
    assert m.extra == {k: v for k, v in old_extra.items() if k not in ("canary_s", "canary_ref_s")}
    dumped = m.to_json_dict()
    assert {k: v for k, v in dumped.items() if k not in ("canary_s", "canary_ref_s", "extra")} == \
        {k: v for k, v in stored.items() if k != "extra"}
    assert Measurement.model_validate(dumped) == m
