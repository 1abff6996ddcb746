"""mrcnn-reproduce: a smoke run of the command (trains, writes results after each run, resumes
without retraining, writes the report and chart), and the report's verdicts."""

import json
import os

import pytest

from mrcnn_plugin.cli import reproduce as cli
from mrcnn_plugin.reproduce import report, runner
from mrcnn_plugin.reproduce.variants import (
    SCHEDULES,
    TABLES,
    VARIANTS,
    Direction,
    parse_tables,
    variants_of,
)


def test_smoke_run_resumes_and_reports(tmp_path, data_root, monkeypatch, capsys):
    out = str(tmp_path / "reproduce")
    args = ["--tables", "2d", "--seeds", "1", "--schedule", "smoke", "--output-dir", out,
            "--data-root", data_root, "--no-progress"]  # fmt: skip
    cli.main(args)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert sorted(results["runs"]) == ["smoke/c5_roialign/seed0", "smoke/c5_roipool/seed0"]
    for run in results["runs"].values():
        assert {"segm/AP", "segm/AP75", "bbox/AP", "bbox/AP75"} <= set(run["metrics"])
        assert run["iterations"] == SCHEDULES["smoke"].max_iter
    assert results["machine"]["cpu"]
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "Table 2d" in text and "| RoIAlign | 1 |" in text and "23.6" in text
    assert os.path.getsize(os.path.join(out, "chart.png")) > 1000
    log = os.path.join(out, "runs", "smoke", "c5_roipool_s0", "log.txt")
    assert "Starting training" in open(log).read()

    # Started again, it trains only what has no result: here nothing, then the one removed.
    trained = []
    saved = dict(results["runs"])

    def fake_run(variant, seed, schedule, run_dir, data_root, opts=()):
        trained.append((variant.key, seed))
        return saved[f"smoke/{variant.key}/seed{seed}"]

    monkeypatch.setattr(runner, "train_and_evaluate", fake_run)
    cli.main(args)
    assert trained == []
    del results["runs"]["smoke/c5_roipool/seed0"]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f)
    cli.main(args)
    assert trained == [("c5_roipool", 0)]
    assert "smoke/c5_roipool/seed0" in runner.load_results(out)["runs"]


def test_bad_results_file_is_named(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--report-only", "--output-dir", str(tmp_path), "--schedule", "smoke"])
    assert exit_info.value.code == 2
    assert "results.json: not valid JSON" in capsys.readouterr().err


def test_tables_and_seeds_flags():
    assert parse_tables("2c,2d") == ["2c", "2d"]
    assert parse_tables(None) == list(TABLES)
    with pytest.raises(ValueError, match="2z"):
        parse_tables("2c,2z")
    assert cli.parse_seeds("3") == [0, 1, 2]
    assert cli.parse_seeds("0,4") == [0, 4]
    # Shared variants are trained once: 2a's C4 is 2b's sigmoid and 2c's RoIAlign avg.
    keys = [v.key for v in variants_of(["2a", "2b", "2c"])]
    assert keys.count("c4") == 1 and len(keys) == len(set(keys))
    assert VARIANTS["fpn_builtin"].builtin and not VARIANTS["fpn"].builtin
    for table in TABLES.values():
        for row in table.rows:
            assert os.path.exists(VARIANTS[row.variant].config_path)


@pytest.mark.parametrize(
    "better,worse,delta,expected",
    [
        ([30.0, 31.0], [20.0, 21.0], 3.0, "reproduced"),
        ([30.0, 40.0], [29.0, 31.0], 3.0, "same sign, within noise"),
        ([20.0, 21.0], [30.0, 31.0], 3.0, "not reproduced"),
        ([20.0, 20.5], [20.2, 20.4], 0.0, "reproduced (equal within noise)"),
        ([30.0, 30.1], [20.0, 20.1], 0.0, "not reproduced (differ)"),
        ([0.3, 0.2], [0.0, 0.1], 3.0, "inconclusive (both below 1 AP)"),
    ],
)
def test_verdict(better, worse, delta, expected):
    values = {"a": {"segm/AP": better}, "b": {"segm/AP": worse}}
    result, diff, se = report.verdict(Direction("a", "b", "segm/AP", delta), values)
    assert result == expected
    assert diff == pytest.approx(sum(better) / 2 - sum(worse) / 2)
    assert report.verdict(Direction("a", "c", "segm/AP", delta), values)[0] == "no data"


def test_parallel_jobs_write_every_result(tmp_path, data_root):
    """--jobs 2: the runs are shared by two worker processes, which merge their results into
    one results.json (under its lock) and generate the data once (under the data lock)."""
    out = str(tmp_path / "parallel")
    cli.main(["--tables", "2d", "--seeds", "2", "--schedule", "smoke", "--jobs", "2",
              "--output-dir", out, "--data-root", data_root, "--no-progress"])  # fmt: skip
    runs = runner.load_results(out)["runs"]
    assert sorted(runs) == [f"smoke/{v}/seed{s}" for v in ("c5_roialign", "c5_roipool")
                            for s in (0, 1)]  # fmt: skip
    for run in runs.values():
        assert run["iterations"] == SCHEDULES["smoke"].max_iter
        assert run["metrics"]["bbox/AP"] is not None
    with open(os.path.join(out, "report.md")) as f:
        assert "| RoIAlign | 2 |" in f.read()
