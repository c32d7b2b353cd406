"""suites.published: the GPU step model, priced from the prior alone on this CPU, against the
published throughput of the development rows (torchtitan's Llama 3 runs): median absolute
error at most 15% and every row within 30% (the issue's bar); rows the trainer cannot
express are listed with the reason, not priced."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from suites.published import TABLE, evaluate, report, runconfig


@pytest.fixture(scope="module")
def dev() -> pd.DataFrame:
    table = pd.read_csv(TABLE)
    return evaluate(table[table.split == "dev"])


def test_development_rows_within_the_bar(dev: pd.DataFrame) -> None:
    priced = dev[dev.predicted.notna()]
    assert len(priced) >= 7
    err = priced.error.abs().to_numpy()
    assert np.median(err) <= 0.15, priced[["id", "error"]]
    assert err.max() <= 0.30, priced[["id", "error"]]
    # the spread brackets the prediction
    assert (priced.low <= priced.predicted).all() and (priced.predicted <= priced.high).all()


def test_unexpressible_rows_say_why(dev: pd.DataFrame) -> None:
    row = dev[dev.id == "tt-l3-70b-256gpu-fsdp32-tp8-asynctp"].iloc[0]
    assert pd.isna(row.predicted) and "async tensor parallelism" in row.note
    table = pd.read_csv(TABLE)
    cp = table[table.cp.fillna(1) > 1].iloc[0].copy()  # Llama 3 405B: cp 16 inside pp 16
    cp["checkpointing"] = "full"  # unstated in the source, which refuses it first
    rc, why = runconfig(cp)
    assert rc is None and "cp=16 with pp=16" in why
    assert "not expressible" in report(dev, 1.0)


def test_a_row_becomes_the_published_layout() -> None:
    table = pd.read_csv(TABLE).set_index("id")
    rc, _ = runconfig(table.loc["tt-l3-70b-256gpu-fsdp32-tp8"])
    p, hw = rc.parallel, rc.workload.hardware
    assert (p.dp, p.tp, p.pp, p.zero_stage) == (32, 8, 1, 3)
    assert (hw.devices_per_node, hw.nodes, hw.device_name) == (8, 32, "H100-SXM-96GB-HBM2e")
    assert rc.workload.budget.global_batch_tokens == 512 * 8192
    assert rc.schedule.micro_batch_tokens == 16 * 8192 and rc.checkpointing.policy == "full"
    assert rc.compile == "blocks"
