"""Training curves of a detectron2 run: losses, learning rate and AP over iterations.

Reads ``metrics.json`` (JSONWriter's format: one JSON object per line, each with an
"iteration") and draws three panels: total_loss and every loss_* term, lr, and the overall
bbox/AP, segm/AP and keypoints/AP of the evaluations (those present).
"""

import json
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

AP_KEYS = ("bbox/AP", "segm/AP", "keypoints/AP")
Series = Dict[str, Tuple[List[int], List[float]]]


class MetricsFileError(ValueError):
    """A metrics.json with no training records in it; the message names the file."""


def load_metrics(path: str) -> List[dict]:
    """The records of ``path`` (a metrics.json, or a folder holding one). A line that is not
    a JSON object (e.g. the last line of a run still writing) is skipped with a warning.

    Raises:
        MetricsFileError: no line of the file is a record (an empty or binary file).
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    records, skipped = [], []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is skipped, not fatal
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                skipped.append(number)
                continue
            if isinstance(record, dict) and "iteration" in record:
                records.append(record)
    if skipped:
        logger.warning(
            "%s: %d line(s) not JSON, skipped (first: %d)", path, len(skipped), skipped[0]
        )
    if not records:
        raise MetricsFileError(f"{path}: no training metrics (no JSON line with an 'iteration')")
    return records


def extract_series(records: List[dict]) -> Series:
    """{name: (iterations, values)} for the losses, "lr" and the AP keys, sorted by iteration.
    A resumed run repeats iterations: the value written last wins. Non-finite values (the
    NaN of an AP with no ground truth) are dropped."""
    wanted = [
        key
        for key in dict.fromkeys(k for r in records for k in r)
        if key == "total_loss" or key.startswith("loss_") or key == "lr" or key in AP_KEYS
    ]
    series = {}
    for key in wanted:
        by_iter = {}
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_iter[int(record["iteration"])] = float(value)
        if by_iter:
            iters = sorted(by_iter)
            series[key] = (iters, [by_iter[i] for i in iters])
    return series


def moving_average(values: List[float], window: int) -> List[float]:
    """Trailing moving average over ``window`` points (1: unchanged)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _marker(iters: List[int]) -> Optional[str]:
    """Dots on short series, which a bare line would not show (a single point)."""
    return "." if len(iters) <= 20 else None


def make_figure(series: Series, title: str = "", smooth: int = 1):
    """A matplotlib Figure with the panels "losses", "learning rate" and "AP"; each line is
    labelled with its metrics.json key. Losses are smoothed over ``smooth`` points."""
    fig, (ax_loss, ax_lr, ax_ap) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    losses = [k for k in series if k == "total_loss" or k.startswith("loss_")]
    for key in sorted(losses, key=lambda k: (k != "total_loss", k)):
        iters, values = series[key]
        width = 2.0 if key == "total_loss" else 1.0
        ax_loss.plot(
            iters, moving_average(values, smooth), label=key, linewidth=width, marker=_marker(iters)
        )
    if "lr" in series:
        iters, values = series["lr"]
        ax_lr.plot(iters, values, label="lr", color="tab:purple", marker=_marker(iters))
    for key in AP_KEYS:
        if key in series:
            ax_ap.plot(*series[key], label=key, marker="o")
    for ax, name in ((ax_loss, "losses"), (ax_lr, "learning rate"), (ax_ap, "AP")):
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax_ap.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(metrics_path: str, output: Optional[str] = None, smooth: int = 1) -> str:
    """Reads ``metrics_path`` (file or folder) and writes the PNG; returns its path (default:
    ``metrics.png`` beside metrics.json)."""
    records = load_metrics(metrics_path)
    if output is None:
        folder = metrics_path if os.path.isdir(metrics_path) else os.path.dirname(metrics_path)
        output = os.path.join(folder, "metrics.png")
    fig = make_figure(extract_series(records), title=metrics_path, smooth=smooth)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
