"""``AUTOTUNE_FAULT``: which fault a trial's process arms, from the spec and its trial number."""

from __future__ import annotations

import pytest

from autotune.train.faults import Fault

SPEC = "crash:trial=1,oom:rank=1:step=2:trial=2,hang:rank=0"


@pytest.mark.parametrize(("trial", "expected"), [
    ("1", Fault("crash", 0, 1)),
    ("2", Fault("oom", 1, 2)),
    ("3", Fault("hang", 0, 1)),  # no trial= : every trial the earlier ones do not claim
    (None, Fault("hang", 0, 1)),  # outside a search only unrestricted faults fire
])
def test_a_trial_arms_its_own_fault(monkeypatch: pytest.MonkeyPatch, trial: str | None,
                                    expected: Fault) -> None:
    monkeypatch.setenv("AUTOTUNE_FAULT", SPEC)
    if trial is None:
        monkeypatch.delenv("AUTOTUNE_TRIAL", raising=False)
    else:
        monkeypatch.setenv("AUTOTUNE_TRIAL", trial)
    assert Fault.from_env() == expected


def test_no_spec_or_no_match_arms_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOTUNE_FAULT", raising=False)
    assert Fault.from_env() is None
    monkeypatch.setenv("AUTOTUNE_FAULT", "crash:trial=4")
    monkeypatch.setenv("AUTOTUNE_TRIAL", "5")
    assert Fault.from_env() is None


@pytest.mark.parametrize("spec", ["explode", "crash:rnk=1", "crash:trial=1,boom:trial=2"])
def test_a_malformed_spec_is_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("AUTOTUNE_FAULT", spec)
    monkeypatch.setenv("AUTOTUNE_TRIAL", "2")
    with pytest.raises(ValueError, match="AUTOTUNE_FAULT"):
        Fault.from_env()
