"""tools/plot_metrics.py on a synthetic metrics.json written the way detectron2 writes it."""

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
from tool_helpers import ROOT

from mrcnn_plugin.cli.plot_metrics import main
from mrcnn_plugin.plotting import (
    MetricsFileError,
    extract_series,
    load_metrics,
    make_figure,
    moving_average,
)

LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def _training_record(it):
    losses = {k: 1.0 / (it + 1 + i) for i, k in enumerate(LOSSES)}
    return {
        "iteration": it,
        "total_loss": sum(losses.values()),
        **losses,
        "lr": 0.02 * min(1.0, (it + 1) / 10),
        "data_time": 0.01,
        "fast_rcnn/cls_accuracy": 0.9,
    }


@pytest.fixture
def metrics_file(tmp_path):
    records = [_training_record(it) for it in range(19, 100, 20)]
    records.insert(3, {"iteration": 59, "bbox/AP": 10.0, "segm/AP": 8.0, "bbox/APl": math.nan})
    records.append({"iteration": 99, "bbox/AP": 20.0, "segm/AP": 15.5, "keypoints/AP": 3.0})
    records.append({**_training_record(99), "total_loss": 0.5})  # a resumed run repeats 99
    lines = [json.dumps(r) for r in records] + ['{"iteration": 100, "total_lo']  # cut short
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_series(metrics_file):
    records = load_metrics(str(metrics_file.parent))  # a folder works too
    assert len(records) == 8  # the truncated last line is skipped
    series = extract_series(records)
    assert set(series) == {"total_loss", *LOSSES, "lr", "bbox/AP", "segm/AP", "keypoints/AP"}
    iters, values = series["total_loss"]
    assert iters == [19, 39, 59, 79, 99]
    assert values[-1] == 0.5  # the last write of iteration 99 wins
    assert series["loss_mask"][1][0] == pytest.approx(1.0 / 22)
    assert series["lr"][1] == pytest.approx([0.02] * 5)
    assert series["bbox/AP"] == ([59, 99], [10.0, 20.0])
    assert series["segm/AP"] == ([59, 99], [8.0, 15.5])
    assert series["keypoints/AP"] == ([99], [3.0])
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_figure_lines(metrics_file):
    series = extract_series(load_metrics(str(metrics_file)))
    fig = make_figure(series)
    ax_loss, ax_lr, ax_ap = fig.axes
    lines = {line.get_label(): line for line in ax_loss.lines}
    assert set(lines) == {"total_loss", *LOSSES}
    assert list(lines["loss_cls"].get_ydata()) == series["loss_cls"][1]
    assert [line.get_label() for line in ax_lr.lines] == ["lr"]
    ap = {line.get_label(): list(line.get_xdata()) for line in ax_ap.lines}
    assert ap == {"bbox/AP": [59, 99], "segm/AP": [59, 99], "keypoints/AP": [99]}


def test_main_writes_png(metrics_file, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    assert main([str(metrics_file), "--output", str(out), "--smooth", "2"]) is None
    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (1000, 800)  # figsize (8, 10) at 100 dpi
    assert image[..., :3].std() > 0.01  # something was drawn


def test_tool_script_default_output(metrics_file):
    subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(metrics_file.parent)], cwd=ROOT, check=True
    )
    assert (metrics_file.parent / "metrics.png").is_file()


def test_console_script_exits_zero(metrics_file, tmp_path):
    # Installed by setup.py; a console script exits with main()'s return value.
    script = os.path.join(os.path.dirname(sys.executable), "mrcnn-plot-metrics")
    if not os.path.exists(script):
        pytest.skip("the package is not installed with its console scripts")
    out = tmp_path / "curves.png"
    proc = subprocess.run([script, str(metrics_file), "--output", str(out)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_binary_or_missing_metrics_file_is_one_error_line(tmp_path, capsys):
    binary = tmp_path / "metrics.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage\n\x80{\n")
    with pytest.raises(MetricsFileError, match=str(binary)):
        load_metrics(str(binary))
    for path in (binary, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as stop:
            main([str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("mrcnn-plot-metrics: error: ") and str(path) in err[-1], err
