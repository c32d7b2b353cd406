"""`autotune report DIR` on a bench directory and on a run directory: report.md carries the
fixture's numbers, report.html renders in headless Chromium with every figure loaded, absent
data becomes a sentence, and a directory of neither kind is one line and exit code 2."""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autotune.cli import main
from autotune.config import SearchSpace, Workload
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement, Status

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TARGET = 3.0
TIME_LIMIT_S = 600.0
# contender -> per run: time to train (None: aborted at the time limit), tokens/s, MFU, energy J
RUNS: dict[str, list[tuple[float | None, float, float, float]]] = {
    "pad-batch": [(412.0, 2100.0, 0.081, 52_000.0), (398.5, 2150.0, 0.083, 50_500.0),
                  (430.5, 2080.0, 0.080, 54_250.0)],
    "pack": [(205.5, 4300.0, 0.166, 26_000.0), (None, 4100.0, 0.158, 71_000.0),
             (199.0, 4350.0, 0.168, 25_100.0)],
    "tuned": [(150.0, 5800.0, 0.224, 19_000.0), (161.5, 5650.0, 0.218, 20_100.0),
              (144.5, 5900.0, 0.228, 18_400.0)],
}
# speedup intervals as scores.json holds them: pack's aborted run leaves it no upper end
INTERVALS = {"pad-batch": (2.51, 2.98), "pack": (1.21, None), "tuned": (0.93, 1.08)}
RENDERED = {"pad-batch": "2.51–2.98x", "pack": "≥ 1.21x", "tuned": "0.93–1.08x"}
ABORT_REASON = "eval_loss 3.31 after 600 s: quality target 3.0 not reached within the time limit"
RUN_WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "budget": {"global_batch_tokens": 2048, "trials": 8},
}


def olympic_mean(times: list[float | None]) -> float | None:
    """MLPerf's olympic mean, by hand: drop the fastest and the slowest run (an aborted run
    is the slowest), mean the rest; none when an aborted run would be in the mean."""
    ordered = sorted(t if t is not None else np.inf for t in times)[1:-1]
    return None if not ordered or np.inf in ordered else sum(ordered) / len(ordered)


def _result(contender: str, i: int, ttt: float | None, tps: float, mfu: float, energy: float) -> dict:
    end = ttt if ttt is not None else TIME_LIMIT_S
    frac = np.linspace(1 / 6, 1, 6)
    floor = TARGET - 0.05 if ttt is not None else TARGET + 0.31  # an aborted run plateaus
    losses = floor + (6.0 - floor) * (1 - frac) ** 2
    return {"contender": contender, "run": i, "seed": 1000 + i,
            "status": "success" if ttt is not None else "aborted",
            "reason": None if ttt is not None else ABORT_REASON,
            "time_to_train_s": ttt, "wall_s": end + 2.0, "train_samples": int(end * 10),
            "tokens": int(tps * end), "tokens_per_s": tps, "mfu": mfu, "energy_j": energy,
            "steps": int(end), "eval": [{"wall_s": float(t), "step": int(t), "samples": int(t * 10),
                                         "eval_loss": float(loss)}
                                        for t, loss in zip(end * frac, losses)],
            "train": [{"wall_s": float(t), "step": int(t), "loss": float(loss) + 0.1}
                      for t, loss in zip(end * frac, losses)],
            "compliance": {"ok": True, "output": "SUCCESS"}}


def _scores() -> dict:
    """scores.json as the runner writes it, every figure computed here by hand."""
    tuned = olympic_mean([r[0] for r in RUNS["tuned"]])
    assert tuned is not None
    out = {}
    for c, runs in RUNS.items():
        done = [r[0] for r in runs if r[0] is not None]
        om = olympic_mean([r[0] for r in runs])
        out[c] = {"runs": len(runs), "successes": len(done), "olympic_mean_s": om,
                  "min_s": min(done), "max_s": max(done),
                  "tokens_per_s_median": statistics.median(r[1] for r in runs),
                  "mfu_median": statistics.median(r[2] for r in runs),
                  "energy_j_median": statistics.median(r[3] for r in runs),
                  "speedup_of_tuned": om / tuned if om is not None else None}
        # The runner's bootstrap interval is not a hand figure: given here, only rendered.
        out[c]["speedup_low"], out[c]["speedup_high"] = INTERVALS[c]
    return {"contenders": out, "tuned": "tuned", "quality_target": {"eval_loss": TARGET}}


def make_bench_dir(out: Path) -> Path:
    """A bench directory as `autotune bench` lays it out: 3 contenders x 3 runs, one aborted."""
    out.mkdir(parents=True)
    (out / "suite.yaml").write_text(yaml.safe_dump({
        "name": "tiny-ttt", "workload": "tiny", "contenders": list(RUNS), "runs": 3,
        "quality_target": {"eval_loss": TARGET}, "time_limit_s": TIME_LIMIT_S}))
    (out / "fingerprint.json").write_text(json.dumps({
        "host": "bench-host-1", "cpu_model": "AMD EPYC 7B13", "device_kind": "cpu",
        "torch_version": "2.13.0", "python_version": "3.11.2"}))
    lengths = np.random.default_rng(0).lognormal(4.0, 1.2, 2000).astype(int) + 1
    (out / "lengths.json").write_text(json.dumps({"lengths": lengths.tolist()}))
    for c, runs in RUNS.items():
        for i, run in enumerate(runs, 1):
            d = out / "runs" / c / str(i)
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(_result(c, i, *run)))
            (d / "mlperf.log").write_text(":::MLLOG {}\n")
    (out / "scores.json").write_text(json.dumps(_scores()))
    (out / "tuned").mkdir()
    (out / "tuned" / "summary.json").write_text(json.dumps({"config": "pack_mbt2048_fp32"}))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_bench_dir(tmp_path_factory.mktemp("bench") / "out")
    assert main(["report", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A replayed `autotune run` (a recorded measurement of every candidate, the faster
    the more memory) and its report.md as the run wrote it."""
    tmp = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # no models/ or profiles/ of the checkout: the prior on ceilings
        mp.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        Path("workload.yaml").write_text(yaml.safe_dump(RUN_WORKLOAD))
        rcs = list(SearchSpace().grid(Workload.model_validate(RUN_WORKLOAD)))
        comp, _ = StepPredictor(StepModels("fp", "cpu", Ceilings({"fp32": 1e10}, 1e10))).compose(rcs)
        step = 2.2 * comp.compute_s.to_numpy() + 4e-3 * np.exp(comp.log_micro_batches.to_numpy())
        rows = [{"config_json": rc.model_dump_json(), "measurement_json": Measurement(
                    status=Status.COMPLETE, tokens_per_s=tok / s, step_time_s=s, step_times_s=[s] * 3,
                    peak_mem_bytes=int(1e7 + 1e4 * tok / s), warmup_steps=1, timed_steps=3,
                 ).model_dump_json()} for rc, s, tok in zip(rcs, step, comp.tokens_per_step)]
        pd.DataFrame(rows).to_parquet("table.parquet")
        assert main(["run", "--workload", "workload.yaml", "--replay", "table.parquet",
                     "--out", "run1", "--json"]) == 0
    path = tmp / "run1"
    original = (path / "report.md").read_text()
    assert main(["report", str(path)]) == 0
    return path, original


def _row(report: str, first_cell: str) -> list[str]:
    line = next(x for x in report.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_bench_report_carries_the_fixtures_scores(bench: Path) -> None:
    report = (bench / "report.md").read_text()
    scores = _scores()["contenders"]
    for c, runs in RUNS.items():
        times = [r[0] for r in runs if r[0] is not None]
        s = scores[c]
        assert _row(report, f"`{c}`") == [
            f"`{c}`", "3", str(len(times)), f"{olympic_mean([r[0] for r in runs]):,.1f}",
            f"{min(times):,.1f}–{max(times):,.1f}", f"{s['speedup_of_tuned']:.2f}x",
            RENDERED[c], f"{statistics.median(r[1] for r in runs):,.0f}",
            f"{statistics.median(r[2] for r in runs):.1%}",
            f"{statistics.median(r[3] for r in runs) / 1e3:,.2f} kJ"], c
    assert _row(report, "`pad-batch`")[3:6] == ["412.0", "398.5–430.5", "2.75x"]  # by hand
    assert _row(report, "`tuned`")[5] == "1.00x"
    assert f"quality target: eval_loss {TARGET:g}" in report
    aborted = report.split("## Aborted and failed runs")[1]
    assert _row(aborted, "`pack`") == ["`pack`", "2", "1002", "aborted", "602.0", ABORT_REASON]
    assert aborted.count("| `") == 1
    assert _row(report, "host") == ["host", "bench-host-1"]
    assert _row(report, "torch_version") == ["torch_version", "2.13.0"]
    assert "`pack_mbt2048_fp32`, tuned by `autotune run` in `tuned/`" in report
    names = ["time_to_train", "throughput", "eval_loss", "lengths"]
    assert sorted(p.stem for p in (bench / "figures").glob("*.png")) == sorted(names)
    for name in names:
        assert f"(figures/{name}.png)" in report


def test_run_report_keeps_the_runs_text_and_adds_its_figures(run: tuple[Path, str]) -> None:
    path, original = run
    report = (path / "report.md").read_text()
    assert report.startswith(original.rstrip("\n") + "\n\n## Figures\n")
    names = ["predicted_vs_measured", "search_history", "pareto", "cost_breakdown", "lengths"]
    assert sorted(p.stem for p in (path / "figures").glob("*.png")) == sorted(names)
    assert "Not drawn" not in report
    assert "Measured tokens/s of 8 trials by trial number, 0 failed" in report
    html = (path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "figures/" not in html.split("<body>")[1]
    assert main(["report", str(path)]) == 0  # again: its own section replaced, not repeated
    assert (path / "report.md").read_text() == report


def test_absent_data_becomes_a_sentence(bench: Path, run: tuple[Path, str], tmp_path: Path) -> None:
    b = shutil.copytree(bench, tmp_path / "bench")
    (b / "lengths.json").unlink()
    assert main(["report", str(b)]) == 0
    report = (b / "report.md").read_text()
    assert "*Not drawn: the bench directory has no lengths.json.*" in report
    assert not (b / "figures" / "lengths.png").exists()  # the earlier report's plot is gone
    assert (b / "report.html").read_text().count("<img ") == 3
    r = shutil.copytree(run[0], tmp_path / "run")
    (r / "study.db").unlink()
    (r / "workload.yaml").unlink()
    shutil.rmtree(r / "trials")
    assert main(["report", str(r)]) == 0
    report = (r / "report.md").read_text()
    assert report.count("*Not drawn: ") == 4  # all but the cost breakdown: summary.json holds it
    assert "*Not drawn: the run directory has no workload.yaml.*" in report
    assert (r / "report.html").read_text().count("<img ") == 1
    # The figures are drawn from data, never from the markdown the run wrote.
    summary = json.loads((r / "summary.json").read_text())
    del summary["cost_breakdown"]
    (r / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(r)]) == 0
    report = (r / "report.md").read_text()
    assert "## Cost breakdown of the tuned config" in report  # the run's own text stays
    assert report.count("*Not drawn: ") == 5
    assert "summary.json has no cost breakdown" in report


def _listing(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such directory"),
    ("empty", "neither a run directory"),
    ("file", "not a directory"),
    ("broken-result", "runs/pack/2/result.json: not JSON"),
    ("bad-result", "runs/tuned/1/result.json: status: Input should be"),
])
def test_bad_directories_are_one_line_and_exit_2(case: str, expected: str, bench: Path,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("not a directory\n")
    elif case != "missing":
        target = make_bench_dir(target)
        result = target / "runs" / ("pack/2" if case == "broken-result" else "tuned/1") / "result.json"
        if case == "broken-result":
            result.write_text('{"contender": "pack", ')
        else:
            result.write_text(json.dumps({**json.loads(result.read_text()), "status": "done"}))
    before = _listing(tmp_path)
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert _listing(tmp_path) == before  # nothing written


def _browser():  # noqa: ANN202 - selenium's driver, imported only here
    """Headless Chromium through chromedriver; `make test` installs both on Debian."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if shutil.which("apt-get") and os.geteuid() == 0:
            pytest.fail("chromium or chromium-driver is missing but installable here: run "
                        "`make browser` (which `make test` runs)")
        pytest.skip("headless Chromium is absent and cannot be installed here (needs Debian's "
                    "chromium and chromium-driver: apt-get as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    # --no-sandbox: Chromium refuses to run as root with its sandbox, and tests run as root.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def _not_blank(png: bytes) -> tuple[int, float]:
    """Distinct colours of a screenshot and the share of its most common one."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    counts = [n for n, _ in image.getcolors(maxcolors=1 << 24) or []]
    return len(counts), max(counts) / sum(counts)


def test_reports_render_in_headless_chromium(bench: Path, run: tuple[Path, str],
                                             tmp_path: Path) -> None:
    driver = _browser()
    try:
        for path, figures in ((bench, 4), (run[0], 5)):
            driver.get((path / "report.html").as_uri())
            images = driver.execute_script(
                "return Array.from(document.images, i => [i.complete && i.naturalWidth > 0"
                " && i.src.startsWith('data:image/png;base64,'), i.alt])")
            assert len(images) == figures and all(ok and alt for ok, alt in images), images
            # A broken data URI's error quotes it whole: the first 300 characters say enough.
            severe = [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1200, height)  # the whole page in one screenshot
            png = driver.get_screenshot_as_png()
            (tmp_path / f"{path.name}.png").write_bytes(png)
            colours, top = _not_blank(png)
            assert colours > 50 and top < 0.99, (path, colours, top)
    finally:
        driver.quit()
