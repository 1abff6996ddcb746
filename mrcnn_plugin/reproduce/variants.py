"""What ``mrcnn-reproduce`` trains: the CPU-sized variants of the paper's Table 2a-e and
Table 6 (configs/Reproduce/), the paper's numbers and the directions it reports, and the
training schedules.

A variant is one config (plus, for the built-in comparison, detectron2's components swapped
in); a variant shared by several tables (the C4 RoIAlign-avg sigmoid model is Table 2a's C4,
2b's sigmoid and 2c's RoIAlign avg) is trained once per seed.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "Reproduce",
)


@dataclass(frozen=True)
class Variant:
    key: str
    config: str  # file name under configs/Reproduce/
    builtin: bool = False  # swap in detectron2's components (benchmark.use_builtin_components)

    @property
    def config_path(self) -> str:
        return os.path.join(CONFIG_DIR, self.config)


VARIANTS: Dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("c4", "table2a_R_18_C4.yaml"),
        Variant("fpn", "table2a_R_18_FPN.yaml"),
        Variant("c4_softmax", "table2b_R_18_C4_softmax.yaml"),
        Variant("c4_agnostic", "table2b_R_18_C4_class_agnostic.yaml"),
        Variant("c4_roipool", "table2c_R_18_C4_roipool.yaml"),
        Variant("c4_roiwarp_max", "table2c_R_18_C4_roiwarp_max.yaml"),
        Variant("c4_roiwarp_avg", "table2c_R_18_C4_roiwarp_avg.yaml"),
        Variant("c4_roialign_max", "table2c_R_18_C4_roialign_max.yaml"),
        Variant("c5_roipool", "table2d_R_18_C5_roipool.yaml"),
        Variant("c5_roialign", "table2d_R_18_C5_roialign.yaml"),
        Variant("fpn_mlp2", "table2e_R_18_FPN_mlp_2fc.yaml"),
        Variant("fpn_mlp3", "table2e_R_18_FPN_mlp_3fc.yaml"),
        Variant("kp_roipool", "table6_keypoint_R_18_FPN_roipool.yaml"),
        Variant("kp_roialign", "table6_keypoint_R_18_FPN_roialign.yaml"),
        Variant("fpn_builtin", "table2a_R_18_FPN.yaml", builtin=True),
    )
}

# Metric names: "<task>/<COCO field>", task one of bbox, segm, keypoints.
SEGM = ("segm/AP", "segm/AP75")
BOX = ("bbox/AP", "bbox/AP75")
KP = ("keypoints/AP", "keypoints/AP75")


@dataclass(frozen=True)
class Row:
    variant: str  # key in VARIANTS
    label: str
    paper: Dict[str, float] = field(default_factory=dict)  # metric -> the paper's number


@dataclass(frozen=True)
class Direction:
    """A claim of the paper: ``better`` scores higher than ``worse`` on ``metric`` by
    ``paper_delta`` (0: the paper reports them equal)."""

    better: str
    worse: str
    metric: str
    paper_delta: float


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: Tuple[Row, ...]
    metrics: Tuple[str, ...]  # the columns of the measured table
    directions: Tuple[Direction, ...]
    note: str = ""


def _paper(ap: float, ap75: float, task: str = "segm", **more: float) -> Dict[str, float]:
    return {f"{task}/AP": ap, f"{task}/AP75": ap75, **more}


TABLES: Dict[str, Table] = {
    t.key: t
    for t in (
        Table(
            "2a",
            "Table 2a: backbone (paper R-50, here R-18, same depth)",
            (
                Row("c4", "R-18-C4", _paper(30.3, 31.5)),
                Row("fpn", "R-18-FPN", _paper(33.6, 35.3)),
            ),
            SEGM + BOX,
            (
                Direction("fpn", "c4", "segm/AP", 3.3),
                Direction("fpn", "c4", "segm/AP75", 3.8),
            ),
        ),
        Table(
            "2b",
            "Table 2b: multinomial vs independent masks (C4)",
            (
                Row("c4_softmax", "softmax", _paper(24.8, 25.1)),
                Row("c4", "sigmoid", _paper(30.3, 31.5)),
                Row("c4_agnostic", "sigmoid, class-agnostic", {"segm/AP": 29.7}),
            ),
            SEGM + BOX,
            (
                Direction("c4", "c4_softmax", "segm/AP", 5.5),
                Direction("c4", "c4_softmax", "segm/AP75", 6.4),
                Direction("c4", "c4_agnostic", "segm/AP", 0.6),
            ),
            "The class-agnostic row is the paper's Sec. 4.2 text (29.7 vs 30.3).",
        ),
        Table(
            "2c",
            "Table 2c: RoI layer (C4, stride 16)",
            (
                Row("c4_roipool", "RoIPool (max)", _paper(26.9, 26.4)),
                Row("c4_roiwarp_max", "RoIWarp max", _paper(27.2, 27.1)),
                Row("c4_roiwarp_avg", "RoIWarp avg", _paper(27.1, 27.1)),
                Row("c4_roialign_max", "RoIAlign max", _paper(30.2, 31.8)),
                Row("c4", "RoIAlign avg", _paper(30.3, 31.5)),
            ),
            SEGM + BOX,
            (
                Direction("c4", "c4_roipool", "segm/AP", 3.4),
                Direction("c4", "c4_roipool", "segm/AP75", 5.1),
                Direction("c4", "c4_roiwarp_avg", "segm/AP", 3.2),
                Direction("c4_roialign_max", "c4_roiwarp_max", "segm/AP", 3.0),
                Direction("c4_roiwarp_max", "c4_roipool", "segm/AP", 0.3),
            ),
        ),
        Table(
            "2d",
            "Table 2d: RoIPool vs RoIAlign on C5 (stride 32), FPN-style heads",
            (
                Row(
                    "c5_roipool",
                    "RoIPool",
                    _paper(23.6, 21.6, **{"bbox/AP": 28.2, "bbox/AP75": 26.9}),
                ),
                Row(
                    "c5_roialign",
                    "RoIAlign",
                    _paper(30.9, 32.1, **{"bbox/AP": 34.0, "bbox/AP75": 36.4}),
                ),
            ),
            SEGM + BOX,
            (
                Direction("c5_roialign", "c5_roipool", "segm/AP", 7.3),
                Direction("c5_roialign", "c5_roipool", "segm/AP75", 10.5),
                Direction("c5_roialign", "c5_roipool", "bbox/AP", 5.8),
                Direction("c5_roialign", "c5_roipool", "bbox/AP75", 9.5),
            ),
        ),
        Table(
            "2e",
            "Table 2e: mask branch (FPN)",
            (
                Row("fpn_mlp2", "MLP fc 512-512", _paper(31.5, 32.8)),
                Row("fpn_mlp3", "MLP fc 512-512-512", _paper(31.5, 32.6)),
                Row("fpn", "FCN 4 conv", _paper(33.6, 35.3)),
            ),
            SEGM + BOX,
            (
                Direction("fpn", "fpn_mlp2", "segm/AP", 2.1),
                Direction("fpn", "fpn_mlp3", "segm/AP", 2.1),
                Direction("fpn", "fpn_mlp2", "segm/AP75", 2.5),
            ),
            "The paper's MLPs are 1024 wide; the CPU counterparts 512.",
        ),
        Table(
            "6",
            "Table 6: RoIPool vs RoIAlign for keypoints (FPN, synthetic persons)",
            (
                Row("kp_roipool", "RoIPool", _paper(59.8, 66.7, "keypoints")),
                Row("kp_roialign", "RoIAlign", _paper(64.2, 69.7, "keypoints")),
            ),
            KP + BOX,
            (
                Direction("kp_roialign", "kp_roipool", "keypoints/AP", 4.4),
                Direction("kp_roialign", "kp_roipool", "keypoints/AP75", 3.0),
            ),
        ),
        Table(
            "builtin",
            "Plugin vs detectron2's built-in components (FPN config of 2a)",
            (
                Row("fpn", "plugin (MRCNN* components)"),
                Row("fpn_builtin", "detectron2 built-in"),
            ),
            SEGM + BOX,
            (
                Direction("fpn", "fpn_builtin", "segm/AP", 0.0),
                Direction("fpn", "fpn_builtin", "bbox/AP", 0.0),
            ),
            "Same architecture, data, schedule and seeds: the APs should agree within noise.",
        ),
    )
}


@dataclass(frozen=True)
class Schedule:
    """How long each variant trains and on how much data. ``max_iter`` is the same for every
    variant of a table, so the comparisons within a table are at equal training."""

    name: str
    max_iter: int
    num_train: int
    num_val: int
    warmup_iters: int
    ims_per_batch: int = 4
    base_lr: float = 0.01

    def opts(self) -> List[str]:
        """Config overrides (KEY VALUE ...): the lr drops 10x at 80% of the iterations."""
        return [
            "SOLVER.MAX_ITER", str(self.max_iter),
            "SOLVER.STEPS", f"({max(int(self.max_iter * 0.8), 1)},)",
            "SOLVER.WARMUP_ITERS", str(self.warmup_iters),
            "SOLVER.IMS_PER_BATCH", str(self.ims_per_batch),
            "SOLVER.BASE_LR", str(self.base_lr),
            "SOLVER.CHECKPOINT_PERIOD", str(self.max_iter + 1),
            "TEST.EVAL_PERIOD", "0",
        ]  # fmt: skip


SCHEDULES: Dict[str, Schedule] = {
    # A handful of iterations on a tiny subset: checks that everything runs, not the AP.
    "smoke": Schedule("smoke", max_iter=2, num_train=8, num_val=2, warmup_iters=1, ims_per_batch=2),
    # 80 minutes on 2 CPU cores, one training per core (measured, README). 600 iterations
    # is where the C4 mask head first scores clearly above 0 on this data (200: mask AP 0).
    "full": Schedule(
        "full", max_iter=600, num_train=600, num_val=100, warmup_iters=50, ims_per_batch=2
    ),
}


def parse_tables(spec: Optional[str]) -> List[str]:
    """ "2c,2d" -> ["2c", "2d"]; None or "all" -> every table. Unknown keys are an error."""
    if spec is None or spec.strip() == "all":
        return list(TABLES)
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TABLES]
    if unknown or not keys:
        raise ValueError(
            f"--tables: unknown table(s) {unknown or spec!r}; choose from {list(TABLES)}"
        )
    return list(dict.fromkeys(keys))


def variants_of(tables: List[str]) -> List[Variant]:
    """The variants the tables need, each once, in table order."""
    keys = [row.variant for t in tables for row in TABLES[t].rows]
    return [VARIANTS[k] for k in dict.fromkeys(keys)]
