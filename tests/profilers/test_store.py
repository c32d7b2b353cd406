"""The profile store: one schema version and one fingerprint per store, atomic parts, and a
clear refusal for anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from profilers.store import SCHEMA_VERSION, ProfileStore, StoreError


def _rows(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"key": keys, "family": "gemm", "median_s": [1e-3] * len(keys),
                         "samples_s": [[1e-3, 2e-3]] * len(keys)})


def test_parts_round_trip_with_version_and_fingerprint(tmp_path: Path) -> None:
    store = ProfileStore.open(tmp_path / "s", "fp-a", {"device_kind": "cpu"})
    store.append("gemm", _rows(["a", "b"]))
    store.append("gemm", _rows(["c"]))
    table = store.load("gemm")
    assert table.key.tolist() == ["a", "b", "c"]  # write order kept
    assert set(table.schema_version) == {SCHEMA_VERSION} and set(table.fingerprint) == {"fp-a"}
    assert table.samples_s.iloc[0].tolist() == [1e-3, 2e-3]
    assert store.keys("gemm") == {"a", "b", "c"} and store.families() == ["gemm"]
    assert store.rows("gemm") == 3
    again = ProfileStore.open(tmp_path / "s", "fp-a")
    assert again.fingerprint == {"device_kind": "cpu"} and len(again.load("gemm")) == 3
    assert list((tmp_path / "s" / "gemm").glob("*.tmp")) == []


def test_another_fingerprint_is_refused_naming_both(tmp_path: Path) -> None:
    ProfileStore.open(tmp_path, "fp-a")
    with pytest.raises(StoreError, match="holds fingerprint fp-a, this environment is fp-b"):
        ProfileStore.open(tmp_path, "fp-b")


def test_another_schema_version_is_refused_naming_both(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text(json.dumps({"schema_version": 0, "fingerprint_key": "x"}))
    with pytest.raises(StoreError, match=f"schema version 0, this autotune reads version {SCHEMA_VERSION}"):
        ProfileStore.open(tmp_path, "x")


def test_a_part_of_another_fingerprint_is_refused(tmp_path: Path) -> None:
    store = ProfileStore.open(tmp_path, "fp-a")
    ProfileStore(tmp_path, "fp-b").append("gemm", _rows(["z"]))  # a part copied in from elsewhere
    with pytest.raises(StoreError, match="holds fingerprint fp-b, the store is fp-a"):
        store.load("gemm")


def test_a_corrupt_part_is_named_with_what_to_do(tmp_path: Path) -> None:
    store = ProfileStore.open(tmp_path, "fp-a")
    part = store.append("gemm", _rows(["a"]))
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(StoreError, match=rf"{part.name} is not a readable parquet file.*delete it"):
        store.load("gemm")


def test_a_file_where_the_store_should_be(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        ProfileStore.open(tmp_path / "f", "fp-a")
