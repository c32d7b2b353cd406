"""The bad-input catalogue: malformed input to every command is refused before any work.

Each case must exit 2 with exactly one stderr line ``autotune: error: ...`` naming the problem,
no traceback, nothing on stdout and no file written. tests/cli/test_bad_input.py holds the
RunConfig cases of ``measure``/``train`` and the common flags; these add the rest:

run        YAML syntax error in a --workload file
run        unknown key in a --workload file
run        wrong type in a --workload file (layers: "two")
run        --storage postgresql:// on a port nothing listens on
run        --storage sqlite:// in a folder that does not exist
run        --out whose last part is '..' (path traversal)
worker     --study with a path in it (../x)
run        --resume of a folder that is not a run
run        --steps -1
run        --space file with an unknown knob
run        memory cap 0 in the workload
run        num_sequences 10**10 in the workload
predict    wrong type in the RunConfig
predict    dp*tp*pp*cp (2) != devices (4)
predict    tp=3 does not divide heads=4
predict    pp=2 does not divide layers=3
predict    micro-batch of 10**12 tokens
predict    --models folder that does not exist
predict    --models folder with a corrupt models.json
predict    --models folder fitted under a foreign feature version
predict    data file: empty .npy (zero bytes)
predict    data file: binary garbage in a .npy
predict    data file: a .parquet that is not one
predict    data file: negative length
predict    data file: token id outside the vocabulary
predict    data file: negative token id
predict    data file: a parquet 'length' column of floats
predict    data file: unsupported suffix (.csv)
predict    RunConfig YAML that is a list, not a mapping
trace      --out that is a file
trace      dp*tp*pp*cp != devices
trace      --active 0
measure    data file: a .jsonl of zero bytes
fit        --measurements parquet without the measurement columns
fit        --collectives folder without collective_fit.parquet
fit        --profiles folder that does not exist
fit        --profiles store with a corrupt store.json
fit        --profiles store of a foreign schema version
fit        --measurements file that is not parquet
profile    --families with an unknown family
profile    --out that is a file
profile    --space file with a YAML syntax error
profile    --min-bytes above --max-bytes
profile    --budget-s 0
kernels    tune --cache holding binary garbage
kernels    tune --cache of a foreign machine
kernels    tune --kernel that does not exist
bench      suite with an unknown contender
bench      suite with runs: 0
bench      --runs 0
bench      unknown suite name
bench      --out whose last part is '..' (path traversal)
bench      suite YAML that is a list, not a mapping
report     DIR that is a file
report     DIR that does not exist
report     DIR that is neither a run nor a bench directory
import     --workload that is neither a file nor a preset
export     unknown --format
export     unknown key in the RunConfig
import     DeepSpeed JSON with an unknown key
import     DeepSpeed file that is not JSON
import     Accelerate YAML with a syntax error
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from autotune.cli import main

GOOD = {
    "workload": {
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64,
                  "max_seq_len": 256},
        "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128, "seed": 0},
        "hardware": {"device": "cpu", "devices_per_node": 1, "nodes": 1},
        "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4},
    },
    "schedule": {"policy": "pack", "micro_batch_tokens": 128},
}


def _rc(edit: Callable[[dict], object] | None = None, *, data: str | None = None) -> str:
    """The good RunConfig as YAML, edited; ``data`` points it at a data file."""
    cfg = json.loads(json.dumps(GOOD))
    if data is not None:
        cfg["workload"]["data"] = {"path": data}
    if edit is not None:
        edit(cfg)
    return yaml.safe_dump(cfg)


def _wl(edit: Callable[[dict], object] | None = None) -> str:
    cfg = json.loads(json.dumps(GOOD["workload"]))
    if edit is not None:
        edit(cfg)
    return yaml.safe_dump(cfg)


def _devices(n: int, **parallel: int) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg["workload"]["hardware"]["devices_per_node"] = n
        cfg["parallel"] = parallel
    return edit


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _parquet(columns: dict[str, list]) -> bytes:
    import io

    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buf)
    return buf.getvalue()


def _suite(**over: object) -> str:
    suite = {"name": "bad", "workload": "tiny", "contenders": ["pad-batch"], "runs": 1,
             "quality_target": {"eval_loss": 4.0}, "time_limit_s": 10} | over
    return yaml.safe_dump(suite)


GARBAGE = bytes(range(256)) * 4
FOREIGN_CACHE = json.dumps({"schema_version": 1, "fingerprint_key": "another-machine",
                            "entries": {}})
FOREIGN_STORE = json.dumps({"schema_version": 99, "fingerprint_key": "another-machine"})
FOREIGN_MODELS = json.dumps({"version": 1, "feature_version": -1, "fingerprint": "x"})

# (argv, files to write first (relative to tmp), distinctive substring of the one error line)
CASES: dict[str, tuple[list[str], dict[str, str | bytes], str]] = {
    # --- run
    "run/yaml syntax": (["run", "--workload", "{tmp}/w.yaml"],
                        {"w.yaml": "model:\n  layers: 1\n   hidden: 3\n"}, "YAML syntax error"),
    "run/unknown key": (["run", "--workload", "{tmp}/w.yaml"],
                        {"w.yaml": _wl(lambda c: c["model"].update(layerz=1))},
                        "model.layerz: unknown key"),
    "run/wrong type": (["run", "--workload", "{tmp}/w.yaml"],
                       {"w.yaml": _wl(lambda c: c["model"].update(layers="two"))},
                       "model.layers: Input should be a valid integer"),
    "run/storage unreachable": (
        ["run", "--workload", "{tmp}/w.yaml", "--out", "{tmp}/r", "--storage",
         "postgresql://nobody@127.0.0.1:1/x"], {"w.yaml": _wl()},
        "--storage postgresql://nobody@127.0.0.1:1/x: cannot open the study"),
    "run/storage missing folder": (
        ["run", "--workload", "{tmp}/w.yaml", "--out", "{tmp}/r", "--storage",
         "sqlite:////nonexistent/dir/x.db"], {"w.yaml": _wl()},
        "--storage sqlite:////nonexistent/dir/x.db: cannot open the study"),
    "run/out traversal": (["run", "--workload", "{tmp}/w.yaml", "--out", "{tmp}/a/.."],
                          {"w.yaml": _wl()}, "run name '..' must be"),
    "worker/study traversal": (["worker", "--storage", "sqlite:///{tmp}/s.db", "--study", "../x"],
                               {}, "study name '../x' must be"),
    "run/resume not a run": (["run", "--workload", "{tmp}/w.yaml", "--resume", "{tmp}"],
                             {"w.yaml": _wl()}, "not a run directory"),
    "run/steps -1": (["run", "--steps", "-1"], {}, "expected a positive integer, got -1"),
    "run/space unknown knob": (["run", "--workload", "{tmp}/w.yaml", "--space", "{tmp}/s.yaml"],
                               {"w.yaml": _wl(), "s.yaml": "policies: [pack]\n"},
                               "policies: unknown key"),
    "run/space dtype typo": (["run", "--workload", "{tmp}/w.yaml", "--space", "{tmp}/s.yaml"],
                             {"w.yaml": _wl(), "s.yaml": "dtype: [fp23]\n"},
                             "dtype.0: Input should be 'fp32' or 'bf16' (got 'fp23')"),
    "run/space zero stage 5": (["run", "--workload", "{tmp}/w.yaml", "--space", "{tmp}/s.yaml"],
                               {"w.yaml": _wl(), "s.yaml": "zero_stage: [0, 5]\n"},
                               "zero_stage.1: Input should be less than or equal to 3"),
    "run/memory cap 0": (["run", "--workload", "{tmp}/w.yaml"],
                         {"w.yaml": _wl(lambda c: c["budget"].update(memory_cap_gb=0))},
                         "memory_cap_gb: Input should be greater than 0"),
    "run/num_sequences 1e10": (["run", "--workload", "{tmp}/w.yaml"],
                               {"w.yaml": _wl(lambda c: c["data"].update(num_sequences=10**10))},
                               "num_sequences: Input should be less than or equal to 10000000"),
    # --- predict (its RunConfig and data go through the same loader as measure and train)
    "predict/wrong type": (["predict", "{tmp}/rc.yaml"],
                           {"rc.yaml": _rc(lambda c: c["schedule"].update(policy=7))},
                           "schedule.policy: Input should be"),
    "predict/degrees vs devices": (["predict", "{tmp}/rc.yaml"],
                                   {"rc.yaml": _rc(_devices(4, dp=2))},
                                   "= 2 does not match the 4 devices"),
    "predict/tp vs heads": (["predict", "{tmp}/rc.yaml"],
                            {"rc.yaml": _rc(lambda c: (c["workload"]["model"].update(
                                heads=4, kv_heads=4, layers=3), _devices(3, tp=3)(c)))},
                            "tp=3 does not divide heads=4"),
    "predict/pp vs layers": (["predict", "{tmp}/rc.yaml"],
                             {"rc.yaml": _rc(lambda c: (c["workload"]["model"].update(layers=3),
                                                        _devices(2, pp=2)(c)))},
                             "pp=2 does not divide layers=3"),
    "predict/micro-batch 1e12 tokens": (
        ["predict", "{tmp}/rc.yaml"],
        {"rc.yaml": _rc(lambda c: c["schedule"].update(micro_batch_tokens=10**12))},
        "micro_batch_tokens: Input should be less than or equal to 16777216"),
    "predict/models missing": (["predict", "{tmp}/rc.yaml", "--models", "{tmp}/nope"],
                               {"rc.yaml": _rc()}, "nope: no such folder"),
    "predict/models corrupt": (["predict", "{tmp}/rc.yaml", "--models", "{tmp}/m"],
                               {"rc.yaml": _rc(), "m/models.json": "{not json"},
                               "is not a models manifest"),
    "predict/models foreign version": (["predict", "{tmp}/rc.yaml", "--models", "{tmp}/m"],
                                       {"rc.yaml": _rc(), "m/models.json": FOREIGN_MODELS},
                                       "fitted on feature version -1"),
    "predict/empty npy": (["predict", "{tmp}/rc.yaml"],
                          {"rc.yaml": _rc(data="d.npy"), "d.npy": b""},
                          "not a readable .npy array"),
    "predict/garbage npy": (["predict", "{tmp}/rc.yaml"],
                            {"rc.yaml": _rc(data="d.npy"), "d.npy": GARBAGE},
                            "not a readable .npy array"),
    "predict/not parquet": (["predict", "{tmp}/rc.yaml"],
                            {"rc.yaml": _rc(data="d.parquet"), "d.parquet": GARBAGE},
                            "not a readable parquet file"),
    "predict/negative length": (["predict", "{tmp}/rc.yaml"],
                                {"rc.yaml": _rc(data="d.jsonl"),
                                 "d.jsonl": '{"length": 5}\n{"length": -3}\n'},
                                "line 2: negative length -3"),
    "predict/token id above vocab": (["predict", "{tmp}/rc.yaml"],
                                     {"rc.yaml": _rc(data="d.jsonl"),
                                      "d.jsonl": '{"input_ids": [1, 2, 64]}\n'},
                                     "vocab"),
    "predict/negative token id": (["predict", "{tmp}/rc.yaml"],
                                  {"rc.yaml": _rc(data="d.jsonl"),
                                   "d.jsonl": '{"input_ids": [1, -2, 3]}\n'},
                                  "vocab"),
    "predict/float lengths parquet": (["predict", "{tmp}/rc.yaml"],
                                      {"rc.yaml": _rc(data="d.parquet"),
                                       "d.parquet": _parquet({"length": [3.5, 4.0]})},
                                      "column 'length' must hold integers"),
    "predict/unsupported data suffix": (["predict", "{tmp}/rc.yaml"],
                                        {"rc.yaml": _rc(data="d.csv"), "d.csv": "length\n3\n"},
                                        "unsupported data file type '.csv'"),
    "predict/runconfig not a mapping": (["predict", "{tmp}/rc.yaml"], {"rc.yaml": "- 1\n- 2\n"},
                                        "expected a mapping of keys at the top level"),
    # --- trace, measure
    "trace/out is a file": (["trace", "{tmp}/rc.yaml", "--out", "{tmp}/f"],
                            {"rc.yaml": _rc(), "f": "x"}, "exists and is not a folder"),
    "trace/degrees vs devices": (["trace", "{tmp}/rc.yaml", "--out", "{tmp}/t"],
                                 {"rc.yaml": _rc(_devices(1, dp=2))},
                                 "= 2 does not match the 1 devices"),
    "trace/active 0": (["trace", "{tmp}/rc.yaml", "--active", "0"], {"rc.yaml": _rc()},
                       "expected a positive integer, got 0"),
    "measure/zero-byte jsonl": (["measure", "{tmp}/rc.yaml", "--out", "{tmp}/o"],
                                {"rc.yaml": _rc(data="d.jsonl"), "d.jsonl": b""}, "empty data"),
    # --- fit
    "fit/measurements wrong columns": (
        ["fit", "--profiles", "{tmp}/p", "--out", "{tmp}/m", "--measurements", "{tmp}/x.parquet"],
        {"p/store.json": json.dumps({"schema_version": 1, "fingerprint_key": "k"}),
         "x.parquet": _parquet({"a": [1, 2]})},
        "not a measurements table (no column config_json, measurement_json)"),
    "fit/collectives missing": (["fit", "--profiles", "{tmp}/p", "--out", "{tmp}/m",
                                 "--collectives", "{tmp}/nope"],
                                {"p/store.json": json.dumps({"schema_version": 1,
                                                             "fingerprint_key": "k"})},
                                "no collective_fit.parquet there"),
    "fit/profiles missing": (["fit", "--profiles", "{tmp}/nope", "--out", "{tmp}/m"], {},
                             "holds no profile store"),
    "fit/profiles corrupt": (["fit", "--profiles", "{tmp}/p", "--out", "{tmp}/m"],
                             {"p/store.json": GARBAGE}, "is not a profile store manifest"),
    "fit/profiles foreign version": (["fit", "--profiles", "{tmp}/p", "--out", "{tmp}/m"],
                                     {"p/store.json": FOREIGN_STORE}, "has schema version 99"),
    "fit/measurements not parquet": (
        ["fit", "--profiles", "{tmp}/p", "--out", "{tmp}/m", "--measurements", "{tmp}/x.parquet"],
        {"p/store.json": json.dumps({"schema_version": 1, "fingerprint_key": "k"}),
         "x.parquet": GARBAGE}, "x.parquet: not a readable parquet file"),
    # --- profile
    "profile/unknown family": (["profile", "--families", "gemm,warp", "--out", "{tmp}/p"], {},
                               "unknown family 'warp'"),
    "profile/out is a file": (["profile", "--out", "{tmp}/f"], {"f": "x"},
                              "is a file, not a folder"),
    "profile/space yaml syntax": (["profile", "--space", "{tmp}/s.yaml", "--out", "{tmp}/p"],
                                  {"s.yaml": "dtype: [fp32\n"}, "YAML syntax error"),
    "profile/min above max bytes": (["profile", "--families", "collective", "--min-bytes",
                                     "1MiB", "--max-bytes", "4KiB", "--out", "{tmp}/p"], {},
                                    "is above --max-bytes"),
    "profile/budget 0": (["profile", "--budget-s", "0", "--out", "{tmp}/p"], {},
                         "--budget-s must be positive"),
    # --- kernels tune
    "kernels/garbage cache": (["kernels", "tune", "--cache", "{tmp}/c.json"],
                              {"c.json": GARBAGE}, "not a tuning cache"),
    "kernels/foreign cache": (["kernels", "tune", "--cache", "{tmp}/c.json"],
                              {"c.json": FOREIGN_CACHE}, "tuned on device another-machine"),
    "kernels/unknown kernel": (["kernels", "tune", "--kernel", "warp", "--cache", "{tmp}/c.json"],
                               {}, "--kernel warp: no such kernel"),
    # --- bench
    "bench/unknown contender": (["bench", "{tmp}/s.yaml", "--out", "{tmp}/b"],
                                {"s.yaml": _suite(contenders=["pad-batch", "magic"])},
                                "unknown contender 'magic'"),
    "bench/zero runs in suite": (["bench", "{tmp}/s.yaml", "--out", "{tmp}/b"],
                                 {"s.yaml": _suite(runs=0)}, "runs: Input should be greater than 0"),
    "bench/--runs 0": (["bench", "smoke", "--runs", "0"], {}, "expected a positive integer, got 0"),
    "bench/unknown suite": (["bench", "nosuchsuite"], {}, "'nosuchsuite' is neither a file"),
    "bench/out traversal": (["bench", "{tmp}/s.yaml", "--out", "{tmp}/a/.."],
                            {"s.yaml": _suite()}, "bench directory name '..' must be"),
    "bench/suite not a mapping": (["bench", "{tmp}/s.yaml", "--out", "{tmp}/b"],
                                  {"s.yaml": "- smoke\n- tiny\n"},
                                  "expected a mapping of keys at the top level, got list"),
    # --- report, export, import
    "report/a file": (["report", "{tmp}/f.txt"], {"f.txt": "x"}, "not a directory"),
    "report/missing": (["report", "{tmp}/nope"], {}, "nope: no such directory"),
    "report/empty folder": (["report", "{tmp}/e"], {"e/.keep": ""}, "neither a run directory"),
    "import/unknown workload": (["import", "{tmp}/ds.json", "--from", "deepspeed", "--workload",
                                 "huge"], {"ds.json": "{}"}, "--workload 'huge' is neither"),
    "export/unknown format": (["export", "{tmp}/rc.yaml", "--format", "jax"], {"rc.yaml": _rc()},
                              "invalid choice: 'jax'"),
    "export/unknown key": (["export", "{tmp}/rc.yaml", "--format", "deepspeed", "--out",
                            "{tmp}/ds.json"],
                           {"rc.yaml": _rc(lambda c: c.update(paralel={"dp": 1}))},
                           "paralel: unknown key"),
    "import/unknown key": (["import", "{tmp}/ds.json", "--from", "deepspeed", "--out",
                            "{tmp}/rc.yaml"],
                           {"ds.json": json.dumps({"train_micro_batch_size_per_gpu": 1,
                                                   "zero_optimisation": {"stage": 1}})},
                           "zero_optimisation: unknown key"),
    "import/not json": (["import", "{tmp}/ds.json", "--from", "deepspeed", "--out",
                         "{tmp}/rc.yaml"], {"ds.json": "{'stage': 1"}, "not valid JSON"),
    "import/accelerate yaml syntax": (["import", "{tmp}/acc.yaml", "--from", "accelerate",
                                       "--out", "{tmp}/rc.yaml"],
                                      {"acc.yaml": "num_processes: 1\n  mixed: [\n"},
                                      "YAML syntax error"),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                              case: str) -> None:
    argv, files, expected = CASES[case]
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    # Default output folders (results/, models/, profiles/, traces/) land in tmp_path.
    monkeypatch.chdir(tmp_path)
    # and nothing lands in the cache either (measured ceilings, tuning caches): an empty one
    # per case, so what an earlier case cached cannot hide a write
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(cache))
    before, cached = _snapshot(tmp_path), _snapshot(cache)

    code = main([a.format(tmp=tmp_path) for a in argv])

    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(err) == 1, captured.err
    assert err[0].startswith("autotune: error: ") and expected in err[0], err[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert _snapshot(tmp_path) == before
    assert _snapshot(cache) == cached
