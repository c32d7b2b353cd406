"""Synthetic data: shape, determinism, learnable structure; and the file loaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autotune.config import DataSpec, ModelDims
from autotune.data import MarkovSource, global_batches, load_dataset
from autotune.data.sequences import bimodal_lengths, longsft_lengths
from autotune.errors import UserError

DIMS = ModelDims(layers=1, hidden=16, heads=2, kv_heads=1, ffn=32, vocab=100, max_seq_len=300)


def test_longsft_follows_the_chunkflow_bins_scaled_to_max_len() -> None:
    lengths = longsft_lengths(400_000, 2048, np.random.default_rng(0))
    s = 2048 / 32768  # published edges 1K, 4K, 32K scaled so 32K lands on max_len
    frac = [np.mean(lengths < 1024 * s), np.mean((lengths >= 1024 * s) & (lengths < 4096 * s)),
            np.mean(lengths >= 4096 * s)]
    # Rounding moves a sliver across the edges; the weights are 0.90, 0.08, 0.02.
    assert frac == pytest.approx([0.90, 0.08, 0.02], abs=0.004)
    assert lengths.max() == 2048 and lengths.min() >= 2


def test_bimodal_has_a_long_mode_near_three_quarters_of_max_len() -> None:
    lengths = bimodal_lengths(100_000, 1000, np.random.default_rng(0))
    long = lengths[lengths > 500]
    assert len(long) / len(lengths) == pytest.approx(0.1, abs=0.01)
    assert np.median(long) == pytest.approx(750, abs=10)


def test_presets_are_deterministic_by_seed() -> None:
    a = load_dataset(DataSpec(preset="longsft", num_sequences=50, max_len=256, seed=3), DIMS)
    b = load_dataset(DataSpec(preset="longsft", num_sequences=50, max_len=256, seed=3), DIMS)
    c = load_dataset(DataSpec(preset="longsft", num_sequences=50, max_len=256, seed=4), DIMS)
    assert np.array_equal(a.sequences.tokens, b.sequences.tokens)
    assert not np.array_equal(a.lengths, c.lengths)


def test_markov_entropy_floor_matches_an_independent_count() -> None:
    src = MarkovSource(50, seed=1)
    seqs, floor = src.sample(np.array([30, 7, 19]), np.random.default_rng(2))
    nll, n = 0.0, 0
    for i in range(len(seqs)):
        x = seqs.seq(i).tolist()
        assert x[0] == 0
        for t in range(1, len(x)):
            p1, p2 = x[t - 1], x[t - 2] if t >= 2 else 0
            a, b, c = src._mix
            order2 = 1 + (p2 * a + p1 * b + c) % 49
            p = src.p_order2 * (x[t] == order2)
            p += (1 - src.p_order2) * sum(w for s, w in zip(src.successors[p1],
                                                            src.successor_probs) if s == x[t])
            nll -= np.log(p)
            n += 1
    assert floor == pytest.approx(nll / n, rel=1e-12)
    assert floor < np.log(50) / 2  # learnable: far below the uniform loss


def test_global_batches_fill_the_token_budget_in_arrival_order() -> None:
    lengths = np.array([5, 3, 8, 2, 7, 4])
    it = global_batches(lengths, global_batch_tokens=10, seed=0)
    order = np.random.default_rng([0, 0]).permutation(6)
    seen = []
    for _ in range(3):
        b = next(it)
        assert lengths[b].sum() <= 10
        seen.extend(b.tolist())
    assert seen == order[:len(seen)].tolist()


def _spec(path: Path) -> DataSpec:
    return DataSpec(path=str(path))


def test_jsonl_tokens_lengths_and_mixed(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"input_ids": [1, 2, 3]}\n\n{"length": 5}\n')
    ds = load_dataset(_spec(f), DIMS)
    assert ds.lengths.tolist() == [3, 5]
    assert ds.sequences.seq(0).tolist() == [1, 2, 3]
    assert ds.entropy_floor is None  # user tokens: the floor is unknown


def test_parquet_and_npy(tmp_path: Path) -> None:
    pd.DataFrame({"input_ids": [[1, 2], [3, 4, 5]]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"length": [4, 9]}).to_parquet(tmp_path / "b.parquet")
    np.save(tmp_path / "c.npy", np.array([6, 2, 8]))
    assert load_dataset(_spec(tmp_path / "a.parquet"), DIMS).lengths.tolist() == [2, 3]
    assert load_dataset(_spec(tmp_path / "b.parquet"), DIMS).lengths.tolist() == [4, 9]
    ds = load_dataset(_spec(tmp_path / "c.npy"), DIMS)
    assert ds.lengths.tolist() == [6, 2, 8] and ds.entropy_floor is not None


@pytest.mark.parametrize("content, message", [
    (b'{"input_ids": [1, 2]}\n\xff\xfe\n', "line 2: not UTF-8 text"),
    (b'{"input_ids": [1, 2]}\n{"length": 3,\n', "line 2: malformed JSON"),
    (b'{"tokens": [1]}\n', "line 1: expected an object with 'input_ids' or 'length'"),
    (b'{"input_ids": [1, "a"]}\n', "line 1: 'input_ids' must be a list of integers"),
    (b'{"input_ids": [1, 100]}\n', "line 1: token id 100 is outside the vocabulary [0, 100)"),
    (b'{"length": 301}\n', "line 1: sequence of 301 tokens exceeds the model's context limit"),
    (b"\n\n", "empty data"),
    (b'{"length": 1}\n', "empty data"),
])
def test_bad_jsonl_names_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        load_dataset(_spec(f), DIMS)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data file not found"):
        load_dataset(_spec(tmp_path / "missing.jsonl"), DIMS)
    with pytest.raises(UserError, match="unsupported data file type '.csv'"):
        load_dataset(_spec(tmp_path / "x.csv"), DIMS)
    np.save(tmp_path / "obj.npy", np.array([[1, 2]], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="not a readable .npy"):
        load_dataset(_spec(tmp_path / "obj.npy"), DIMS)
    np.save(tmp_path / "two.npy", np.ones((2, 2), dtype=np.int64))
    with pytest.raises(UserError, match="1-D integer array"):
        load_dataset(_spec(tmp_path / "two.npy"), DIMS)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable parquet file"):
        load_dataset(_spec(tmp_path / "junk.parquet"), DIMS)
    (tmp_path / "d.json").write_text(json.dumps({"length": 3}))
    with pytest.raises(UserError, match="unsupported data file type"):
        load_dataset(_spec(tmp_path / "d.json"), DIMS)
