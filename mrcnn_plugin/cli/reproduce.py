"""Reproduce the paper's ablations (Table 2a-e, Table 6) and plugin vs detectron2's built-in
components at CPU size on the synthetic data, and report them beside the paper.

    mrcnn-reproduce                                   # every table, 2 seeds, full schedule
    mrcnn-reproduce --tables 2c,2d --seeds 3          # two tables, seeds 0, 1, 2
    mrcnn-reproduce --schedule smoke --seeds 1        # a few iterations: checks the set-up
    mrcnn-reproduce --jobs 2 --threads 1              # two trainings at a time (default:
                                                      # one per core, at most one per seed)
    mrcnn-reproduce --report-only                     # redraw the report from results.json

Writes to --output-dir: results.json (after every run; an interrupted reproduction started
again with the same flags resumes with the first run that has no result; several processes may
share the folder), report.md (the measured table beside the paper's numbers, each direction
marked reproduced or not), chart.png
(AP per variant, with the spread over seeds) and runs/<schedule>/<variant>_s<seed>/ (each
run's log and COCO evaluation). The synthetic data go under --data-root/reproduce_<schedule>.
"""

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

import torch

from ..reproduce import SCHEDULES, bar_chart, load_results, markdown, parse_tables, run_all
from ..reproduce.runner import ResultsFileError, machine_info
from ..reproduce.variants import variants_of
from .common import DEFAULT_DATA_ROOT, reports_bad_input


def parse_seeds(spec: str) -> List[int]:
    """ "2" -> [0, 1]; "0,3" -> [0, 3]."""
    try:
        if "," in spec:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
        else:
            seeds = list(range(int(spec)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or a comma list, got {spec!r}"
        ) from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one seed >= 0, got {spec!r}")
    return seeds


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(desc="mrcnn-reproduce", unit="run", dynamic_ncols=True, **kwargs)


@reports_bad_input("mrcnn-reproduce")
def main(argv: Optional[List[str]] = None):
    """Console entry point; ``argv`` defaults to sys.argv[1:]."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tables", default="all", help="comma list of 2a,2b,2c,2d,2e,6,builtin")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1], help="count or comma list")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument("--output-dir", default="output/reproduce")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of each training (default 1; --jobs runs several)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="trainings at a time, each in its own process with --threads threads (default: "
        "one per CPU core, at most one per seed)",
    )
    parser.add_argument("--report-only", action="store_true", help="no training: report only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tables = parse_tables(args.tables)
    except ValueError as e:
        parser.error(str(e))
    schedule = SCHEDULES[args.schedule]
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.jobs is None:
        args.jobs = max(1, min(len(args.seeds), (os.cpu_count() or 1) // args.threads))
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        _reproduce(args, tables, schedule)
    except ResultsFileError as e:
        print(f"mrcnn-reproduce: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _reproduce(args, tables, schedule):
    start = time.perf_counter()
    if args.report_only:
        data = load_results(args.output_dir)
    else:
        data = run_all(
            variants_of(tables),
            args.seeds,
            schedule,
            args.output_dir,
            os.path.join(args.data_root, f"reproduce_{schedule.name}"),
            args.opts,
            progress=None if args.no_progress else _progress,
            jobs=args.jobs,
        )
    report = markdown(data, schedule, args.seeds, tables)
    machine = data.get("machine") or machine_info()
    seconds = sum(
        r["train_seconds"] + r["eval_seconds"]
        for k, r in data["runs"].items()
        if k.startswith(schedule.name + "/")
    )
    header = (
        f"# mrcnn-reproduce: {', '.join(tables)}\n\n"
        f"Machine: {machine['cpu']} ({machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"bfloat16 autocast {'on' if machine['bf16_autocast'] else 'off'}). "
        f"Train + eval time of the runs: {seconds / 60:.1f} min.\n\n"
    )
    report_path = os.path.join(args.output_dir, "report.md")
    with open(report_path, "w") as f:
        f.write(header + report)
    chart = bar_chart(
        data, schedule, args.seeds, tables, os.path.join(args.output_dir, "chart.png")
    )
    print(header + report)
    print(f"wrote {report_path}, {chart} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
