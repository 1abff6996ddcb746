"""``mrcnn-reproduce``: the paper's Table 2a-e and Table 6 ablations (and plugin vs detectron2's
built-in components), trained at CPU size on the synthetic data and reported beside the paper.

variants.py: what is trained and the paper's numbers; runner.py: training runs with resumable
results; report.py: markdown table and bar chart.
"""

from .report import bar_chart, markdown, verdict
from .runner import load_results, run_all
from .variants import SCHEDULES, TABLES, VARIANTS, parse_tables, variants_of

__all__ = [
    "SCHEDULES",
    "TABLES",
    "VARIANTS",
    "bar_chart",
    "load_results",
    "markdown",
    "parse_tables",
    "run_all",
    "variants_of",
    "verdict",
]
