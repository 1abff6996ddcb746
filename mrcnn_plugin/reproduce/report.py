"""The reproduction's report: per table, the mean and spread over seeds of each metric beside
the paper's number, each paper direction marked reproduced or not (markdown), and a bar
chart of AP per variant with the spread (PNG).

Verdicts on a direction "A beats B by the paper's delta d on metric m", from the measured
difference of means D and its standard error se (the seeds' standard deviations, sqrt(sA^2/nA +
sB^2/nB); 0 with one seed):

- d > 0: "reproduced" when D > 0 and D > 2 se; "same sign, within noise" when 0 < D <= 2 se;
  "not reproduced" when D <= 0.
- d == 0 (the paper reports them equal, or the plugin-vs-built-in check): "reproduced (equal
  within noise)" when |D| <= 2 se or |D| < 1 AP point, else "not reproduced (differ)".
- either way "inconclusive (both below 1 AP)" when neither variant reaches 1 AP: a model
  that has not learnt the task says nothing about the direction.
"""

import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from .variants import TABLES, VARIANTS, Direction, Schedule

NOISE_Z = 2.0  # differences within 2 standard errors count as noise
EQUAL_TOLERANCE = 1.0  # AP points within which "equal" claims hold regardless of the spread
LEARNT_AP = 1.0  # below this for both variants, a direction is inconclusive


def collect(
    data: dict, schedule: Schedule, seeds: Sequence[int]
) -> Dict[str, Dict[str, List[float]]]:
    """variant -> metric -> the values over the seeds that have a result."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for key in VARIANTS:
        for seed in seeds:
            run = data["runs"].get(f"{schedule.name}/{key}/seed{seed}")
            if run is None:
                continue
            for metric, value in run["metrics"].items():
                if value is not None:
                    out.setdefault(key, {}).setdefault(metric, []).append(value)
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(
    direction: Direction, values: Dict[str, Dict[str, List[float]]]
) -> Tuple[str, Optional[float], Optional[float]]:
    """(verdict, measured difference of means, its standard error); ("no data", None, None)."""
    a = values.get(direction.better, {}).get(direction.metric)
    b = values.get(direction.worse, {}).get(direction.metric)
    if not a or not b:
        return "no data", None, None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if max(ma, mb) < LEARNT_AP:
        return f"inconclusive (both below {LEARNT_AP:g} AP)", diff, se
    if direction.paper_delta == 0:
        equal = abs(diff) <= NOISE_Z * se or abs(diff) < EQUAL_TOLERANCE
        return ("reproduced (equal within noise)" if equal else "not reproduced (differ)"), diff, se
    if diff <= 0:
        return "not reproduced", diff, se
    if diff > NOISE_Z * se:
        return "reproduced", diff, se
    return "same sign, within noise", diff, se


def _cell(vals: Optional[List[float]]) -> str:
    if not vals:
        return "–"
    mean, std = mean_std(vals)
    return f"{mean:.1f} ± {std:.1f}"


def _metric_label(metric: str) -> str:
    task, name = metric.split("/")
    return {"segm": "mask", "bbox": "box", "keypoints": "kp"}[task] + " " + name


def markdown(data: dict, schedule: Schedule, seeds: Sequence[int], tables: Sequence[str]) -> str:
    """The report as markdown: one section per table, then its directions."""
    values = collect(data, schedule, seeds)
    lines = [
        f"Schedule `{schedule.name}` ({schedule.max_iter} iterations of {schedule.ims_per_batch} "
        f"images, {schedule.num_train} training / {schedule.num_val} validation images), "
        f"seeds {list(seeds)}. Cells: mean ± sample std over the seeds (COCO AP, %); "
        "paper numbers are COCO minival (R-50/ResNeXt, 160k+ iterations on 8 GPUs).",
        "",
    ]
    for key in tables:
        table = TABLES[key]
        lines += [f"### {table.title}", ""]
        header = ["variant", "n"]
        for metric in table.metrics:
            header += [_metric_label(metric), "paper"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table.rows:
            got = values.get(row.variant, {})
            n = max((len(v) for v in got.values()), default=0)
            cells = [row.label, str(n)]
            for metric in table.metrics:
                paper = row.paper.get(metric)
                cells += [_cell(got.get(metric)), "–" if paper is None else f"{paper:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for d in table.directions:
            result, diff, se = verdict(d, values)
            names = {r.variant: r.label for r in table.rows}
            claim = (
                f"{names[d.better]} = {names[d.worse]}"
                if d.paper_delta == 0
                else f"{names[d.better]} > {names[d.worse]} by {d.paper_delta:+.1f}"
            )
            measured = "–" if diff is None else f"{diff:+.1f} (± {se:.1f} s.e.)"
            lines.append(
                f"- {_metric_label(d.metric)}: paper {claim}; measured {measured}: **{result}**"
            )
        if table.note:
            lines += ["", table.note]
        lines.append("")
    return "\n".join(lines)


def bar_chart(
    data: dict, schedule: Schedule, seeds: Sequence[int], tables: Sequence[str], path: str
) -> str:
    """One panel per table: AP and AP75 of its main task per variant, mean with the seeds'
    spread (min to max) as error bars, and the seeds as dots. Writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = collect(data, schedule, seeds)
    cols = min(len(tables), 4)
    rows = -(-len(tables) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(tables) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, tables):
        table = TABLES[key]
        metrics = table.metrics[:2]
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            for i, row in enumerate(table.rows):
                vals = values.get(row.variant, {}).get(metric, [])
                x = i + (j - (len(metrics) - 1) / 2) * width
                if not vals:
                    continue
                mean = statistics.fmean(vals)
                err = [[mean - min(vals)], [max(vals) - mean]]
                ax.bar(x, mean, width, yerr=err, capsize=3, color=f"C{j}",
                       label=_metric_label(metric) if i == 0 else None)  # fmt: skip
                ax.plot([x] * len(vals), vals, "k.", markersize=4)
        ax.set_xticks(range(len(table.rows)))
        ax.set_xticklabels([r.label for r in table.rows], rotation=20, ha="right", fontsize=8)
        head, _, rest = table.title.partition(":")
        ax.set_title(f"{head}:{rest[:38]}" if rest else head[:44], fontsize=9)
        ax.set_ylabel("AP (%)")
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # near-0 APs drawn as near 0, not full height
        ax.legend(fontsize=7)
    fig.suptitle(f"mrcnn-reproduce, schedule '{schedule.name}', seeds {list(seeds)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
