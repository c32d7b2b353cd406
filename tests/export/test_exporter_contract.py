"""The exporter contract, for every registered format: a new exporter proves itself by
being registered (it joins the parametrization)."""

from __future__ import annotations

import pytest
from export_cases import CASES, facts_of, runconfig

from autotune.config import RunConfig
from autotune.export import EXPORTERS, export_runconfig, live_knobs

# What each target cannot express at all, in the cases of conftest.CASES.
REFUSED = {
    ("accelerate", "sorted-dp2-pp2-zero1-gpipe"): "Accelerate's FSDP and DeepSpeed plugins "
                                                  "have no pipeline stages",
    ("trl", "sorted-dp2-pp2-zero1-gpipe"): "TRL's trainer has no pipeline parallelism",
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_every_live_knob_is_carried_or_substituted_once(fmt: str, case: str) -> None:
    rc = runconfig(case)
    result = export_runconfig(rc, fmt, facts_of(rc))
    if (fmt, case) in REFUSED:
        assert result.text is None and not result.unmapped
        assert any(REFUSED[fmt, case] in r for r in result.refused), result.refused
        return
    assert result.text and not result.refused
    knobs = live_knobs(rc)
    substituted = [u.knob.split("=", 1)[0] for u in result.unmapped]
    assert len(substituted) == len(set(substituted)), substituted
    assert not set(substituted) & set(result.mapped)
    assert set(substituted) | set(result.mapped) == set(knobs)
    for u in result.unmapped:
        name, value = u.knob.split("=", 1)
        assert value == ("none" if knobs[name] is None else str(knobs[name]))
        assert u.substitute and u.why


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_export_is_deterministic(fmt: str) -> None:
    rc = runconfig("chunkflow-dp2-tp2-zero2-selective")
    assert export_runconfig(rc, fmt, facts_of(rc)) == export_runconfig(rc, fmt, facts_of(rc))


@pytest.mark.parametrize("fmt, edit, reason", [
    ("deepspeed", {"pp": 2, "dp": 2, "zero_stage": 2}, "pipeline engine runs only ZeRO stages 0 "
                                                       "and 1"),
    ("deepspeed", {"tp": 2, "pp": 2, "dp": 1}, "AutoTP training shards models outside its "
                                                "pipeline engine"),
])
def test_deepspeed_refuses_what_it_cannot_run(fmt: str, edit: dict, reason: str) -> None:
    data = runconfig("pack-dp4-zero3-full-bf16").model_dump()
    data["parallel"] |= edit
    rc = RunConfig.model_validate(data)
    result = export_runconfig(rc, fmt, facts_of(rc))
    assert result.text is None
    assert any(reason in r for r in result.refused), result.refused


def test_context_parallelism_is_refused_where_the_target_lacks_it() -> None:
    # The RunConfig rules refuse cp > 1 (autotune's trainer has none), so this config is
    # built without them, as a caller holding another trainer's plan could.
    rc = runconfig("pack-dp4-zero3-full-bf16")
    rc = rc.model_copy(update={"parallel": rc.parallel.model_copy(update={"dp": 2, "cp": 2})})
    result = export_runconfig(rc, "deepspeed", facts_of(rc))
    assert result.text is None and "no context-parallel degree" in result.refused[0]
    megatron = export_runconfig(rc, "megatron", facts_of(rc))
    assert "--context-parallel-size 2" in megatron.text.splitlines()


def test_unknown_format_names_the_choices() -> None:
    rc = runconfig("padmax-cpu-one-rank")
    with pytest.raises(KeyError, match="choose from"):
        export_runconfig(rc, "colossalai", facts_of(rc))
