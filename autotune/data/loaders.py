"""Readers for user data files: token sequences or plain lengths, in .jsonl, .parquet or .npy.

A record is either a token sequence (``input_ids``) or a bare ``length``; lengths get tokens
from the synthetic Markov source so that any length distribution can be trained on.
Every problem is a UserError naming the file and, for .jsonl, the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.errors import UserError

__all__ = ["RawRecords", "read_records"]


@dataclass
class RawRecords:
    """Records in file order: ``seqs[i]`` holds tokens, or None where only ``lengths[i]`` is known."""

    lengths: np.ndarray
    seqs: list[np.ndarray | None]
    where: list[str]  # "line 7" or "row 7", to name a record in messages


def _record(obj: object, where: str, path: Path) -> tuple[int, np.ndarray | None]:
    if not isinstance(obj, dict) or not ({"input_ids", "length"} & obj.keys()):
        raise UserError(f"{path}: {where}: expected an object with 'input_ids' or 'length'")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in ids):
            raise UserError(f"{path}: {where}: 'input_ids' must be a list of integers")
        return len(ids), np.asarray(ids, dtype=np.int64)
    n = obj["length"]
    if not isinstance(n, int) or isinstance(n, bool):
        raise UserError(f"{path}: {where}: 'length' must be an integer, got {n!r}")
    return n, None


def _read_jsonl(path: Path) -> RawRecords:
    lengths, seqs, where = [], [], []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {lineno}: not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {lineno}: malformed JSON ({exc.msg})") from None
            n, ids = _record(obj, f"line {lineno}", path)
            lengths.append(n)
            seqs.append(ids)
            where.append(f"line {lineno}")
    return RawRecords(np.asarray(lengths, dtype=np.int64), seqs, where)


def _read_parquet(path: Path) -> RawRecords:
    import pandas as pd  # deferred: pandas costs a second at import

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    where = [f"row {i}" for i in range(len(frame))]
    if "input_ids" in frame.columns:
        seqs = []
        for i, ids in enumerate(frame["input_ids"]):
            arr = np.asarray(ids)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise UserError(f"{path}: row {i}: 'input_ids' must be a list of integers")
            seqs.append(arr.astype(np.int64))
        return RawRecords(np.fromiter((len(s) for s in seqs), np.int64, len(seqs)), seqs, where)
    if "length" in frame.columns:
        col = frame["length"]
        if not np.issubdtype(col.dtype, np.integer):
            raise UserError(f"{path}: column 'length' must hold integers, has {col.dtype}")
        return RawRecords(col.to_numpy(np.int64), [None] * len(frame), where)
    raise UserError(f"{path}: needs a column 'input_ids' or 'length', has {list(frame.columns)}")


def _read_npy(path: Path) -> RawRecords:
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle user files
    except (ValueError, OSError, EOFError) as exc:  # EOFError: a file of zero bytes
        raise UserError(f"{path}: not a readable .npy array of lengths ({exc})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: expected a 1-D integer array of lengths, "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    return RawRecords(arr.astype(np.int64), [None] * len(arr), [f"index {i}" for i in range(len(arr))])


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet, ".npy": _read_npy}


def read_records(path: Path) -> RawRecords:
    """Read a data file; the suffix picks the format."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported data file type {path.suffix!r}; "
                        f"use one of {sorted(_READERS)}")
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    return reader(path)
