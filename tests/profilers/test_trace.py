"""Step profiling: attribution of profiler events to families, checked against sums computed
independently from the raw events, and the ``autotune trace`` command around it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

from autotune.cli import main
from autotune.config import RunConfig
from autotune.train.trainer import Trainer
from profilers.families import FAMILIES
from profilers.records import Status
from profilers.trace import (
    attribute,
    name_family,
    profile_steps,
    run_trace,
    scope_family,
    summarize_events,
)

TINY = {
    "workload": {
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
        "data": {"preset": "longsft", "num_sequences": 200, "max_len": 256},
        "budget": {"global_batch_tokens": 1024},
    },
    # Chunks shorter than the longest sequences: the prefix-attention autograd Function runs.
    "schedule": {"policy": "chunkflow", "chunk_size": 128, "micro_batch_tokens": 256},
}
EVALUATE = "autograd::engine::evaluate_function: "


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("trace")
    trainer = Trainer(RunConfig.model_validate(TINY))
    prof = profile_steps(trainer.step, device="cpu", out_dir=out, wait=1, warmup=1, active=2)
    events = prof.events()
    ops, families, head = summarize_events(events, device="cpu")
    return events, ops, families, head, out


# ---- independent references ---------------------------------------------------------------

def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _subtree(e):
    yield e
    for c in e.cpu_children:
        yield from _subtree(c)


def _inclusive_reference(events, is_root) -> float:
    """Inclusive CPU time of the outermost events ``is_root`` accepts, plus that of every
    backward wrapper whose node was created under those roots: a sum of whole subtrees, not
    of per-event attributions. Autograd numbers a node with the counter value that every op
    starting before its creation records, so the creator is the last op to record it."""
    roots = [e for e in events if is_root(e) and not any(is_root(a) for a in _ancestors(e))]
    inside = {id(d) for r in roots for d in _subtree(r)}
    last: dict[tuple[int, int], object] = {}
    for e in events:
        if e.sequence_nr >= 0 and e.scope != 1 and not e.name.startswith(EVALUATE):
            key = (e.thread, e.sequence_nr)
            if key not in last or e.time_range.start >= last[key].time_range.start:
                last[key] = e
    seqs = {key for key, e in last.items() if id(e) in inside}
    total = sum(r.cpu_time_total for r in roots)
    for e in events:
        if e.name.startswith(EVALUATE):
            node = next(c for c in e.cpu_children if c.scope == 1)
            if (node.fwd_thread, node.sequence_nr) in seqs:
                total += e.cpu_time_total
    return total


def _in_scope(e, names: tuple[str, ...]) -> bool:
    return any(a.name in names for a in _ancestors(e))


REFERENCES = {
    "optimizer": lambda e: e.name.startswith(("Optimizer.step#", "Optimizer.zero_grad#"))
    or e.name == "autotune:clip_grad",
    "loss": lambda e: e.name == "autotune:loss",
    "attention": lambda e: e.name == "autotune:attention",
    # Every matmul of the model is an nn.Linear; the lm head's is the loss's.
    "gemm": lambda e: e.name == "aten::linear" and not _in_scope(e, ("autotune:loss",
                                                                     "autotune:attention")),
}


@pytest.mark.parametrize("family", list(REFERENCES))
def test_family_self_time_matches_independent_sum(captured, family: str) -> None:
    events, ops, *_ = captured
    ours = ops.loc[ops["family"] == family, "self_cpu_us"].sum()
    reference = _inclusive_reference(events, REFERENCES[family])
    assert reference > 0
    assert ours == pytest.approx(reference, rel=1e-6)  # both sum the same microseconds


def test_fractions_and_unattributed_add_up(captured) -> None:
    events, ops, families, head, _ = captured
    assert list(families["family"]) == [*FAMILIES, "unattributed"]
    assert families["fraction"].sum() == pytest.approx(1.0, abs=1e-6)
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    measured = sum(s.cpu_time_total for s in steps) / 1e6
    assert head["steps"] == 2 and head["measured_s"] == pytest.approx(measured, rel=1e-9)
    # On one CPU thread the self times of a step's events add up to its wall time, so the
    # remainder must be what the unattributed events themselves took: a family counted
    # twice would show up here as a shortfall.
    rest = families.set_index("family").loc["unattributed", "self_s"]
    unattributed_rows = ops.loc[ops["family"] == "unattributed", "self_cpu_us"].sum() / 1e6
    assert rest == pytest.approx(unattributed_rows, abs=0.01 * measured)
    assert head["coverage"] == pytest.approx(1 - rest / measured, abs=1e-9)


def test_gemm_flops_are_2mnk(captured) -> None:
    _, ops, *_ = captured
    mm = ops[ops["name"] == "aten::mm"]
    assert len(mm) >= 5
    for row in mm.itertuples():
        (m, k), (k2, n) = ast.literal_eval(row.input_shapes)
        assert k == k2
        assert row.flops / row.count == pytest.approx(2 * m * n * k, rel=0.01)


def test_trace_file_is_tensorboard_json(captured) -> None:
    *_, out = captured
    files = list(out.glob("*.pt.trace.json"))
    assert len(files) == 1
    trace = json.loads(files[0].read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # the two active steps after wait+warmup


# ---- the mapping, checked by hand ---------------------------------------------------------

@pytest.mark.parametrize("name, family", [
    ("aten::mm", "gemm"), ("aten::addmm", "gemm"), ("aten::bmm", "gemm"), ("aten::linear", "gemm"),
    ("aten::matmul", "gemm"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_flash_attention_forward", "attention"),
    ("aten::_scaled_dot_product_efficient_attention_backward", "attention"),
    ("_PrefixAttentionCPU", "attention"), ("_PrefixAttentionCPUBackward", "attention"),
    ("aten::cross_entropy_loss", "loss"), ("aten::_log_softmax", "loss"),
    ("aten::_log_softmax_backward_data", "loss"), ("aten::nll_loss_forward", "loss"),
    ("aten::nll_loss_backward", "loss"),
    ("aten::_foreach_addcdiv_", "optimizer"), ("aten::_fused_adamw_", "optimizer"),
    ("aten::mul", "norm"), ("aten::rsqrt", "norm"), ("aten::silu_backward", "norm"),
    ("aten::embedding", "norm"), ("aten::embedding_dense_backward", "norm"), ("aten::copy_", "norm"),
    ("aten::index_select", "norm"), ("torch::autograd::AccumulateGrad", "norm"),
    ("record_param_comms", "collective"), ("c10d::allreduce_", "collective"),
    ("nccl:all_reduce", "collective"), ("gloo:all_reduce", "collective"),
    ("_c10d_functional::all_gather_into_tensor", "collective"),
    ("ProfilerStep#3", None), ("cudaLaunchKernel", None), ("MmBackward0", None),
])
def test_name_family(name: str, family: str | None) -> None:
    assert name_family(name) == family


@pytest.mark.parametrize("name, family", [
    ("autotune:attention", "attention"), ("autotune:loss", "loss"),
    ("autotune:clip_grad", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
    ("Optimizer.zero_grad#AdamW.zero_grad", "optimizer"), ("autotune:other", None),
    ("aten::mm", None),
])
def test_scope_family(name: str, family: str | None) -> None:
    assert scope_family(name) == family


def _families_of(events, name: str, *, backward: bool | None = None) -> dict[str, set[str | None]]:
    """Families given to events called ``name``, keyed by their first input's shape."""
    out: dict[str, set[str | None]] = {}
    for e, family, bw in attribute(events):
        if e.name == name and (backward is None or bw == backward):
            out.setdefault(str(e.input_shapes[0] if e.input_shapes else None), set()).add(family)
    return out


def test_scopes_reach_backward_nodes_and_their_wrappers() -> None:
    """Hand-built graph: x @ w is gemm, h @ head under autotune:loss is loss; their
    MmBackward0 nodes (told apart by the shape of the incoming gradient) follow them, and so
    do the engine's wrappers around the nodes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    head = torch.randn(32, 10, generator=g, requires_grad=True)
    labels = torch.randint(0, 10, (8,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        h = F.silu(x @ w)
        with record_function("autotune:loss"):
            loss = F.cross_entropy(h @ head, labels)
        loss.backward()
        with record_function("autotune:clip_grad"):
            w.grad.mul_(0.5)
    events = prof.events()
    assert _families_of(events, "aten::mm", backward=False) == {"[8, 16]": {"gemm"},
                                                                 "[8, 32]": {"loss"}}
    assert _families_of(events, "MmBackward0") == {"[8, 32]": {"gemm"}, "[8, 10]": {"loss"}}
    wrapper = {f for e, f, _ in attribute(events) if e.name == f"{EVALUATE}MmBackward0"}
    assert wrapper == {"gemm", "loss"}
    assert _families_of(events, "SiluBackward0") == {"[8, 32]": {"norm"}}
    assert set().union(*_families_of(events, "NllLossBackward0").values()) == {"loss"}
    assert set().union(*_families_of(events, "aten::mul_").values()) == {"optimizer"}


def test_recomputed_forward_ops_are_not_their_backward_node() -> None:
    """Under checkpointing the recompute runs inside whichever backward node first needs a
    saved tensor (here sin's, in an attention scope); the recomputed matmul is still gemm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)

    def block(x: torch.Tensor) -> torch.Tensor:
        y = x @ w
        with record_function("autotune:attention"):
            return y.sin()

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    events = prof.events()
    recomputed = [(f, bw) for e, f, bw in attribute(events) if e.name == "aten::mm"
                  and any(a.name == "SinBackward0" for a in _ancestors(e))]
    assert recomputed == [("gemm", False)]  # forward work, though run during backward
    assert _families_of(events, "SinBackward0") == {"[8, 32]": {"attention"}}
    assert set().union(*_families_of(events, "MmBackward0").values()) == {"gemm"}


# ---- the command and the isolated run -----------------------------------------------------

def _write_cfg(tmp_path: Path, cfg: dict | None = None) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg or TINY))
    return path


def test_command_writes_trace_tables_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, out = _write_cfg(tmp_path), tmp_path / "traces" / "tiny"
    argv = ["trace", str(cfg), "--out", str(out), "--wait", "0", "--warmup", "1", "--active", "1"]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "COMPLETE" and summary["steps"] == 1
    assert [r["family"] for r in summary["families"]] == [*FAMILIES, "unattributed"]
    assert sum(r["fraction"] for r in summary["families"]) == pytest.approx(1.0, abs=1e-6)
    ops = pd.read_parquet(out / "ops.parquet")
    assert ops["self_cpu_us"].sum() / 1e6 == pytest.approx(summary["measured_s"], rel=0.01)
    assert "| gemm |" in (out / "families.md").read_text()
    first = list(out.glob("*.pt.trace.json"))
    assert len(first) == 1 and "traceEvents" in json.loads(first[0].read_text())
    # A second run into the same folder replaces the first trace instead of adding to it.
    assert main(argv) == 0
    assert "coverage" in capsys.readouterr().out
    second = list(out.glob("*.pt.trace.json"))
    assert len(second) == 1 and second != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging folder left


@pytest.mark.parametrize("builder, config, timeout_s, status", [
    ("builtins:int", "not a number", 120.0, Status.CRASHED),  # ValueError in the child
    ("os:system", "sleep 60", 5.0, Status.TIMEOUT),  # a hang, cut off by the timeout
])
def test_failed_run_is_a_status_and_leaves_nothing(tmp_path: Path, builder: str, config: str,
                                                    timeout_s: float, status: Status) -> None:
    out = tmp_path / "traces" / "t"  # its parent too is made, and removed again
    outcome = run_trace(builder, Path(config), out, timeout_s=timeout_s)
    assert outcome.status is status and outcome.summary is None and outcome.reason
    assert list(tmp_path.iterdir()) == []


def _bad(tmp_path: Path, what: str) -> tuple[list[str], str]:
    cfg = _write_cfg(tmp_path)
    if what == "missing":
        return ["trace", str(tmp_path / "nope.yaml")], "nope.yaml: file not found"
    if what == "invalid":
        cfg.write_text(yaml.safe_dump({**TINY, "schedule": {"chunk_sise": 3}}))
        return ["trace", str(cfg)], "schedule.chunk_sise: unknown key"
    if what == "active 0":
        return ["trace", str(cfg), "--active", "0"], "expected a positive integer, got 0"
    if what == "out is a file":
        (tmp_path / "taken").write_text("keep me")
        return ["trace", str(cfg), "--out", str(tmp_path / "taken")], "exists and is not a folder"
    two = yaml.safe_load(yaml.safe_dump(TINY))
    two["workload"]["hardware"] = {"devices_per_node": 2}
    two["parallel"] = {"dp": 2}
    cfg.write_text(yaml.safe_dump(two))
    return ["trace", str(cfg)], "trace profiles one process, but dp*tp*pp*cp = 2"


@pytest.mark.parametrize("what", ["missing", "invalid", "active 0", "out is a file", "two ranks"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out, traces/<label>, would land here
    argv, expected = _bad(tmp_path, what)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autotune: error: ") and expected in err[0], err
    assert captured.out == ""
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
