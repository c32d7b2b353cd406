from __future__ import annotations

import json

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
        extra={"tp": 2, "policy": "pack", "lens": [1, 2], "none": None, "ratio": 0.5},
        fingerprint=fingerprint,
    )
    d = m.to_json_dict()
    assert d["status"] == "COMPLETE"
    assert d["fingerprint"]["threads"] == 4
    back = Measurement.model_validate(json.loads(json.dumps(d)))
    assert back == m
    assert type(back.extra["tp"]) is int  # an int knob must not come back as a float


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
