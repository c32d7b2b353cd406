"""The configuration contract: public YAML keys, validity rules, presets, error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from autotune.config import (
    MODEL_PRESETS,
    ModelSpec,
    ParallelConfig,
    RunConfig,
    SearchSpace,
    Workload,
    dump_yaml,
    load_yaml,
    rule_violations,
)
from autotune.errors import UserError

CONTRACT = """\
workload:
  model: {preset: llama-tiny}
  data: {preset: longsft, num_sequences: 512, max_len: 2048, seed: 0}
  hardware: {device: cpu, devices_per_node: 1, nodes: 1}
  budget: {global_batch_tokens: 8192, memory_cap_gb: 8}
schedule: {policy: chunkflow, chunk_size: 512, chunkflow_k: 1, micro_batch_tokens: 512, micro_batch_size: 8}
parallel: {dp: 1, tp: 1, pp: 1, cp: 1, zero_stage: 0}
checkpointing: {policy: none}
kernels: {attention: sdpa}
precision: {dtype: fp32}
seed: 0
"""


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_public_contract_loads_and_round_trips(tmp_path: Path) -> None:
    rc = load_yaml(RunConfig, _write(tmp_path, CONTRACT))
    assert rc.schedule.policy == "chunkflow" and rc.workload.budget.global_batch_tokens == 8192
    again = load_yaml(RunConfig, _write(tmp_path, dump_yaml(rc), "again.yaml"))
    assert again == rc
    # Every key of the contract survives in the dump.
    dumped, given = yaml.safe_load(dump_yaml(rc)), yaml.safe_load(CONTRACT)
    for section, value in given.items():
        if isinstance(value, dict):
            assert set(value) <= set(dumped[section])


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(UserError) as info:
        load_yaml(RunConfig, _write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("edit, expected", [
    ({"schedule": {"chunk_sise": 512}}, "schedule.chunk_sise: unknown key"),
    ({"schedule": {"chunk_size": "big"}}, "schedule.chunk_size: Input should be a valid integer"),
    ({"schedule": {"chunk_size": 0}}, "schedule.chunk_size: Input should be greater than 0 (got 0)"),
    ({"workload": {"budget": {"global_batch_tokens": -5}}},
     "workload.budget.global_batch_tokens: Input should be greater than 0 (got -5)"),
    ({"schedule": {"chunk_size": 1024, "micro_batch_tokens": 512}},
     "chunkflow needs chunk_size <= micro_batch_tokens (chunk_size=1024, micro_batch_tokens=512)"),
    ({"workload": {"model": {"preset": "llama-huge"}}}, "unknown model preset 'llama-huge'"),
    ({"workload": {"data": {"preset": "sharegpt"}}}, "unknown data preset 'sharegpt'"),
    ({"parallel": {"dp": 2}}, "dp*tp*pp*cp = 2*1*1*1 = 2 does not match the 1 devices"),
    ({"schedule": {"policy": "zigzag"}}, "schedule.policy: Input should be"),
    ({"precision": {"dtype": "fp8"}}, "precision.dtype: Input should be 'fp32' or 'bf16'"),
    ({"workload": {"data": {"max_len": 20000}}}, "exceeds the model's context limit"),
])
def test_bad_values_give_one_line_naming_the_key(tmp_path: Path, edit: dict, expected: str) -> None:
    data = yaml.safe_load(CONTRACT)
    for section, sub in edit.items():
        if section == "workload":
            for k, v in sub.items():
                data["workload"][k].update(v)
        else:
            data[section].update(sub)
    message = _error(tmp_path, yaml.safe_dump(data))
    assert expected in message
    assert message.startswith(str(tmp_path / "run.yaml"))
    assert len(message.splitlines()) == 1


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "seed: 0\nschedule: policy: pack\n")
    assert "YAML syntax error at line 2, column 17: mapping values are not allowed here" in message


def test_non_mapping_and_non_utf8(tmp_path: Path) -> None:
    assert "expected a mapping" in _error(tmp_path, "- 1\n- 2\n")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"seed: \xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_yaml(RunConfig, p)


def test_tp_must_divide_heads_and_pp_layers() -> None:
    data = yaml.safe_load(CONTRACT)
    data["workload"]["hardware"]["devices_per_node"] = 12
    data["parallel"] = {"dp": 1, "tp": 4, "pp": 3}
    with pytest.raises(ValueError) as info:
        RunConfig.model_validate(data)
    assert "tp=4 does not divide heads=6" in str(info.value)
    assert "pp=3 does not divide layers=4" in str(info.value)


@pytest.mark.parametrize("preset, params", [
    ("llama3-8b", 8.03e9), ("qwen2.5-7b", 7.62e9), ("llama3-70b", 70.6e9)])
def test_planning_presets_have_the_published_sizes(preset: str, params: float) -> None:
    assert MODEL_PRESETS[preset].total_params() == pytest.approx(params, rel=0.01)


def test_llama_tiny_is_a_few_million_parameters() -> None:
    assert 1e6 < MODEL_PRESETS["llama-tiny"].total_params() < 1e7


def test_hf_config_is_read_for_dims(tmp_path: Path) -> None:
    cfg = {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
           "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
           "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1e6,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    wl = _write(tmp_path, "model: {hf_config: m/config.json}\n", "wl.yaml")
    dims = load_yaml(Workload, wl).model.resolve()
    assert (dims.layers, dims.heads, dims.kv_heads, dims.qkv_bias) == (28, 28, 4, True)
    assert dims.total_params() == MODEL_PRESETS["qwen2.5-7b"].total_params()


def test_hf_config_errors(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        ModelSpec(hf_config=str(tmp_path / "c.json")).resolve()
    with pytest.raises(UserError, match="file not found"):
        ModelSpec(hf_config=str(tmp_path / "none.json")).resolve()


def test_model_spec_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        ModelSpec(preset="llama-tiny", layers=2)
    dims = ModelSpec(layers=2, hidden=64, heads=4, ffn=128, vocab=256).resolve()
    assert dims.kv_heads == 4


def test_workload_file_may_wrap_its_keys(tmp_path: Path) -> None:
    a = load_yaml(Workload, _write(tmp_path, "workload: {budget: {global_batch_tokens: 4096}}\n"))
    b = load_yaml(Workload, _write(tmp_path, "budget: {global_batch_tokens: 4096}\n", "b.yaml"))
    assert a == b and a.budget.global_batch_tokens == 4096


def test_search_space_grid_is_valid_and_refuses_with_the_rule() -> None:
    wl = Workload.model_validate({"hardware": {"devices_per_node": 4}})
    space = SearchSpace(policy=["pack", "chunkflow"], chunk_size=[256, 1024],
                        micro_batch_tokens=[512], chunkflow_k=[1], checkpointing=["none"])
    grid = list(space.grid(wl))
    layouts = {(rc.parallel.dp, rc.parallel.tp, rc.parallel.pp, rc.parallel.cp) for rc in grid}
    assert all(dp * tp * pp * cp == 4 for dp, tp, pp, cp in layouts)
    assert (1, 4, 1, 1) not in layouts  # tp=4 does not divide 6 heads
    # chunk_size 1024 > micro_batch_tokens 512 is invalid for chunkflow: never generated.
    assert all(rc.schedule.chunk_size <= 512 for rc in grid if rc.schedule.policy == "chunkflow")
    rc = grid[0].model_copy(update={"seed": 1})
    assert space.violations(rc) == []
    bad = rc.model_copy(deep=True)
    bad.schedule.policy = "sorted"
    assert "policy='sorted' is not among the choices" in space.violations(bad)[0]


def test_zero_stages_only_where_there_is_data_parallelism_and_degrees_can_be_pinned() -> None:
    wl = Workload.model_validate({"hardware": {"devices_per_node": 2}})
    space = SearchSpace(policy=["pack"], micro_batch_tokens=[1024], zero_stage=[0, 2, 3],
                        checkpointing=["none"])
    grid = list(space.grid(wl))
    # by hand: dp2 x three stages, then tp2 and pp2 once each (no data parallelism to shard)
    assert sorted((rc.parallel.dp, rc.parallel.tp, rc.parallel.pp, rc.parallel.zero_stage)
                  for rc in grid) == [(1, 1, 2, 0), (1, 2, 1, 0), (2, 1, 1, 0), (2, 1, 1, 2),
                                      (2, 1, 1, 3)]
    assert len({rc.model_dump_json() for rc in grid}) == len(grid)
    tp_only = rc_tp = next(rc for rc in grid if rc.parallel.tp == 2)
    assert space.canonical(tp_only.model_copy(update={"parallel": tp_only.parallel.model_copy(
        update={"zero_stage": 3})})) == rc_tp
    no_pp = SearchSpace(policy=["pack"], micro_batch_tokens=[1024], pp=[1], checkpointing=["none"])
    assert {rc.parallel.pp for rc in no_pp.grid(wl)} == {1}
    pp2 = next(rc for rc in grid if rc.parallel.pp == 2)
    assert "pp=2 is not among the choices [1]" in no_pp.violations(pp2)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_in_the_readme_are_valid(path: Path) -> None:
    rc = load_yaml(RunConfig, path)
    assert rule_violations(rc) == []


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples" / "spaces").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_spaces_are_valid(path: Path) -> None:
    space = load_yaml(SearchSpace, path)
    assert list(space.grid(Workload()))  # at least one candidate


def test_kernel_choices_are_knobs_of_the_space() -> None:
    wl = Workload.model_validate({"hardware": {"devices_per_node": 1}})
    one = SearchSpace(policy=["pack"], micro_batch_tokens=[1024], checkpointing=["none"])
    both = one.model_copy(update={"loss": ["full", "fused"], "norm": ["torch", "fused"]})
    grid = list(both.grid(wl))
    assert len(grid) == 4 * len(list(one.grid(wl)))
    assert {(rc.kernels.loss, rc.kernels.norm) for rc in grid} == {
        ("full", "torch"), ("full", "fused"), ("fused", "torch"), ("fused", "fused")}
    fused = next(rc for rc in grid if rc.kernels.loss == "fused")
    assert "loss='fused' is not among the choices ['full']" in one.violations(fused)
    with pytest.raises(ValueError, match="loss"):
        SearchSpace(loss=["chunked"])


@pytest.mark.parametrize("edit, expected", [
    ({"kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}},
     "kernels.attention=varlen needs device cuda"),
    ({"kernels": {"attention": "flex"}}, "kernels.attention=flex needs device cuda"),
    ({"workload": {"hardware": {"device": "cuda"}}, "kernels": {"attention": "varlen"}},
     "runs in 16-bit only"),
    ({"compile": "blocks", "kernels": {"norm": "fused"}}, "the compiler fuses the norm itself"),
    ({"workload": {"hardware": {"devices_per_node": 2}}, "parallel": {
        "dp": 2, "zero_stage": 2, "grad_reduce": "micro_batch"}},
     "grad_reduce=micro_batch with dp > 1 cannot run chunkflow"),
    ({"compile": "all"}, "compile"),
])
def test_gpu_knobs_are_refused_where_they_cannot_run(edit: dict, expected: str) -> None:
    def merge(into: dict, edit: dict) -> None:
        for key, value in edit.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    data = yaml.safe_load(CONTRACT)
    merge(data, edit)
    with pytest.raises(ValueError, match=expected):
        RunConfig.model_validate(data)


@pytest.mark.parametrize("zero, policy, knob, per_step", [
    (0, "pack", "auto", True),  # DDP: accumulate locally, all-reduce once
    (2, "pack", "auto", False),  # ZeRO 2/3: reduce-scatter each micro-batch, grads sharded
    (3, "skrull", "auto", False),
    (2, "chunkflow", "auto", True),  # chunk groups' backward passes differ per rank
    (3, "pack", "step", True),
    (0, "pack", "micro_batch", False),
])
def test_grad_reduce_auto_picks_per_zero_stage_and_policy(zero: int, policy: str, knob: str,
                                                          per_step: bool) -> None:
    p = ParallelConfig(dp=2, zero_stage=zero, grad_reduce=knob)
    assert p.reduce_per_step(policy) is per_step


def test_compile_is_a_knob_of_the_space() -> None:
    wl = Workload.model_validate({"hardware": {"devices_per_node": 1}})
    one = SearchSpace(policy=["pack"], micro_batch_tokens=[1024], checkpointing=["none"])
    both = one.model_copy(update={"compile": ["none", "blocks"]})
    grid = list(both.grid(wl))
    assert sorted(rc.compile for rc in grid) == ["blocks", "none"]
    compiled = next(rc for rc in grid if rc.compile == "blocks")
    assert "compile='blocks' is not among the choices ['none']" in one.violations(compiled)


def test_the_dead_time_budget_is_refused_but_old_tables_still_load() -> None:
    """budget.time_s was never read: a value is refused naming what bounds the measuring,
    and configs recorded with it null (results/tuner/exhaustive.parquet) still load."""
    import pandas as pd
    import pydantic

    from autotune.config import RunConfig, Workload

    with pytest.raises(pydantic.ValidationError, match="--budget-s"):
        Workload.model_validate({"budget": {"time_s": 60}})
    frame = pd.read_parquet(Path(__file__).resolve().parents[2] / "results" / "tuner"
                            / "exhaustive.parquet")
    assert '"time_s":null' in frame.config_json.iloc[0]
    rc = RunConfig.model_validate_json(frame.config_json.iloc[0])
    assert "time_s" not in rc.workload.budget.model_dump()
