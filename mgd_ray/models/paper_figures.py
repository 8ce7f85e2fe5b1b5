"""The mIoU figures the paper reports, each with the table and row it comes from.

Qin, Wu, Li, Xiao, Zheng, Wang: "Multi-Granularity Distillation Scheme Towards Lightweight
Semi-Supervised Semantic Segmentation", ECCV 2022 (arXiv 2208.10169). A study's report and table set
the paper's figure beside its own for the same method, backbone and partition (``study.table``); keeping
them here, transcribed once and tested, means no report re-types a number. The paper's params and FLOPs
(Table 1) are ``models.complexity.PAPER_TABLE1``, beside the code that reproduces them.

What is here: Table 1 (VOC2012 val, 512×512, classic partitions), Table 2 (VOC2012, PseudoSeg's few-label
partitions), Table 3 (Cityscapes val, 800×800), Table 4 (teacher combinations) and Table 5 (loss terms),
both at 1/8 with student ResNet-18, on VOC and Cityscapes. Table 6 (the H_v × W_v sweep) is not.

Tables 4 and 5 run one method, MGD, in several configurations: ``variant`` names which one (the teachers,
or the loss terms the table ticks). Tables 1–3 compare methods, and their rows have no variant (``""``).
Numbers are as printed; where the paper misprints a row, the entry is what the table evidently means and
``note`` says what is printed.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("voc", "voc_pseudoseg", "cityscapes")
PARTITIONS = ("1/16", "1/8", "1/4", "1/2")
METHODS = ("cps_teacher", "supervised", "mean_teacher", "cps", "kd", "cwd", "mgd")


@dataclass(frozen=True)
class PaperFigure:
    """One mIoU the paper prints.

    ``method``, ``backbone`` and ``dataset`` use mgd_ray's names (``config.py``, ``study.config``): the
    paper's "Wide ResNet-34" teacher T_W is ``wide_resnet50_2`` (its 66.83M backbone parameters are
    torchvision's wide_resnet50_2 without its classifier, see ``complexity.PAPER_TABLE1``), and its
    teachers, trained by CPS, are method ``cps_teacher`` under their own backbone.
    ``variant`` tells apart the configurations of Tables 4 and 5: the teachers ("T_D+T_W": first teacher
    T_D, second T_W; "T_D": T_D alone) or the ticked loss terms ("L_Sup+L_P+L_I^TD+L_R^TW"); it is ""
    for the method comparisons of Tables 1–3.
    """

    table: str  # "Table 1" … "Table 4", "Table 5a", "Table 5b"
    dataset: str  # one of DATASETS
    method: str  # one of METHODS
    backbone: str  # mgd_ray backbone name
    partition: str  # one of PARTITIONS
    miou: float  # percent, as printed
    row: str  # the row as printed
    note: str = ""
    variant: str = ""


def _rows(
    table: str,
    dataset: str,
    rows: list[tuple[str, str, str, tuple[float, ...]] | tuple[str, str, str, tuple[float, ...], str]],
) -> list[PaperFigure]:
    """Figures of a Table 1–3 style table: one printed row (method, backbone, row, mIoU per partition)
    per line, so each line reads like the paper's."""
    out = []
    for method, backbone, row, values, *note in rows:
        for partition, miou in zip(PARTITIONS, values, strict=True):
            out.append(PaperFigure(table, dataset, method, backbone, partition, miou, row, *note))
    return out


def _variants(
    table: str, rows: list[tuple[str, str, float, float] | tuple[str, str, float, float, str]]
) -> list[PaperFigure]:
    """Figures of Table 4 or 5: MGD, student ResNet-18, partition 1/8; one (variant, row, VOC, City[, note])
    a line."""
    out = []
    for variant, row, voc, city, *note in rows:
        for dataset, miou in (("voc", voc), ("cityscapes", city)):
            out.append(PaperFigure(table, dataset, "mgd", "resnet18", "1/8", miou, row, *note, variant=variant))
    return out


_TABLE1 = _rows(
    "Table 1",
    "voc",
    [
        (
            "cps_teacher",
            "resnet101",
            "CPS [7] ResNet-101 (T_D)",
            (73.98, 76.43, 77.61, 78.64),
            "Sec. 4.3 quotes the 1/16 figure as 73.97",
        ),
        ("cps_teacher", "wide_resnet50_2", "CPS [7] Wide ResNet-34 (T_W)", (68.17, 71.38, 74.78, 75.85)),
        ("supervised", "resnet18", "Sup. l ResNet-18", (42.17, 55.65, 62.52, 65.39)),
        ("mean_teacher", "resnet18", "MT [44] ResNet-18", (44.61, 56.62, 61.79, 66.48)),
        ("cps", "resnet18", "CPS [7] ResNet-18", (47.13, 60.05, 65.89, 68.69)),
        ("kd", "resnet18", "KD [46] ResNet-18", (56.37, 62.01, 66.23, 68.55)),
        ("cwd", "resnet18", "CWD [38] ResNet-18", (50.45, 58.71, 63.96, 65.82)),
        ("mgd", "resnet18", "Ours (MGD) ResNet-18", (66.86, 68.29, 69.71, 71.59)),
        ("supervised", "mobilenet_v2", "Sup. l MobileNetv2", (46.02, 46.66, 48.19, 49.61)),
        ("mean_teacher", "mobilenet_v2", "MT [44] MobileNetv2", (45.11, 47.20, 49.15, 49.63)),
        ("cps", "mobilenet_v2", "CPS [7] MobileNetv2", (46.57, 48.75, 49.94, 50.52)),
        ("kd", "mobilenet_v2", "KD [46] MobileNetv2", (47.99, 49.30, 50.07, 50.68)),
        ("cwd", "mobilenet_v2", "CWD [38] MobileNetv2", (46.13, 47.45, 48.89, 49.70)),
        ("mgd", "mobilenet_v2", "Ours (MGD) MobileNetv2", (50.95, 52.27, 53.92, 55.88)),
    ],
)

# PseudoSeg's partitions of the 1,464 fine VOC train images: 1/16 (92), 1/8 (183), 1/4 (366), 1/2 (732).
_TABLE2 = _rows(
    "Table 2",
    "voc_pseudoseg",
    [
        ("cps_teacher", "resnet101", "CPS [7] ResNet-101", (64.07, 67.42, 71.71, 75.88)),
        ("cps_teacher", "wide_resnet50_2", "CPS [7] Wide ResNet-34", (60.01, 63.32, 67.84, 72.03)),
        ("supervised", "resnet18", "Sup. l ResNet-18", (15.54, 22.43, 35.78, 51.47)),
        ("mean_teacher", "resnet18", "MT [44] ResNet-18", (12.58, 18.15, 33.71, 50.02)),
        ("cps", "resnet18", "CPS [7] ResNet-18", (24.53, 36.19, 47.61, 56.85)),
        ("mgd", "resnet18", "Ours ResNet-18", (58.03, 61.94, 64.97, 67.40)),
    ],
)

# Table 3's header repeats Table 1's VOC image counts, "1/16 (662) … 1/2 (5291)": the Cityscapes partitions
# (CPS's, data/splits/cityscapes) hold 186, 372, 744 and 1,488 labeled images. The fractions are what count.
_TYPO_R18_IN_MNV2 = "printed as ResNet-18 inside the MobileNetv2 block"
_TABLE3 = _rows(
    "Table 3",
    "cityscapes",
    [
        ("cps_teacher", "resnet101", "CPS [7] ResNet-101 (T_D)", (74.72, 77.62, 78.85, 79.58)),
        ("cps_teacher", "wide_resnet50_2", "CPS [7] Wide ResNet-34 (T_W)", (72.56, 75.41, 77.68, 78.37)),
        ("supervised", "resnet18", "Sup. l ResNet-18", (55.39, 60.71, 67.51, 69.83)),
        ("mean_teacher", "resnet18", "MT [44] ResNet-18", (56.92, 63.61, 67.46, 70.38)),
        ("cps", "resnet18", "CPS [7] ResNet-18", (59.43, 67.35, 70.64, 73.81)),
        ("kd", "resnet18", "KD [46] ResNet-18", (58.10, 64.62, 69.35, 71.76)),
        ("cwd", "resnet18", "CWD [38] ResNet-18", (55.88, 61.47, 67.80, 70.02)),
        ("mgd", "resnet18", "Ours (MGD) ResNet-18", (70.91, 72.65, 74.42, 75.40)),
        ("supervised", "mobilenet_v2", "Sup. l MobileNetv2", (50.06, 51.97, 54.03, 56.86)),
        ("mean_teacher", "mobilenet_v2", "MT [44] MobileNetv2", (51.10, 53.85, 56.21, 57.25)),
        ("cps", "mobilenet_v2", "CPS [7] MobileNetv2", (53.34, 55.61, 57.98, 59.20)),
        ("kd", "mobilenet_v2", "KD [46] ResNet-18", (53.45, 54.89, 55.28, 57.90), _TYPO_R18_IN_MNV2),
        ("cwd", "mobilenet_v2", "CWD [38] ResNet-18", (51.52, 52.64, 54.37, 57.01), _TYPO_R18_IN_MNV2),
        ("mgd", "mobilenet_v2", "Ours (MGD) MobileNetv2", (58.00, 59.27, 61.36, 62.55)),
    ],
)

# Table 4: which teachers MGD distils from (T_D: ResNet-101, T_W: Wide ResNet-34).
_TABLE4 = _variants(
    "Table 4",
    [
        ("T_D", "first teacher T_D, no second teacher", 64.85, 69.63),
        ("T_W", "first teacher T_W, no second teacher", 64.36, 68.98),
        ("T_D+T_D", "first teacher T_D, second teacher T_D", 66.14, 71.19),
        ("T_W+T_W", "first teacher T_W, second teacher T_W", 65.78, 70.92),
        ("T_D+T_W", "first teacher T_D, second teacher T_W", 68.29, 72.65),
    ],
)

# Table 5a: the loss terms by level (L_P is Eq. 2 on labeled and unlabeled data; ^TD/^TW: from which teacher).
# Its L_Sup row is Table 1's and 3's Sup. l ResNet-18 at 1/8; it stays method mgd, as the table's first row.
_TABLE5A = _variants(
    "Table 5a",
    [
        ("L_Sup", "ticked: L_Sup", 55.65, 60.71),
        ("L_Sup+L_P", "ticked: L_Sup, L_P", 63.61, 69.05),
        ("L_Sup+L_P+L_I^TD", "ticked: L_Sup, L_P, L_I^TD", 66.01, 71.03),
        ("L_Sup+L_P+L_R^TW", "ticked: L_Sup, L_P, L_R^TW", 66.02, 71.15),
        ("L_Sup+L_P+L_I^TD+L_R^TW", "ticked: L_Sup, L_P, L_I^TD, L_R^TW", 68.29, 72.65),
        (
            "L_Sup+L_P+L_I^TD+L_I^TW+L_R^TD+L_R^TW",
            "ticked: L_Sup, L_P, L_I^TD, L_I^TW, L_R^TD, L_R^TW",
            67.51,
            71.96,
        ),
    ],
)

# Table 5b: labeled (L_Sup, L_P^l) against labeled and unlabeled distillation.
_TABLE5B = _variants(
    "Table 5b",
    [
        ("L_Sup+L_P^l", "ticked: L_Sup, L_P^l", 58.24, 63.98),
        (
            "L_Sup+L_P^l+L_P^u+L_I^TD+L_I^TW+L_R^TW",
            "ticked: L_Sup, L_P^l, L_P^u, L_I^TD, L_I^TW, L_R^TW",
            68.29,
            72.65,
            "variant as printed, L_I^TW ticked; the figures are Table 5a's L_Sup+L_P+L_I^TD+L_R^TW (no L_I^TW), "
            "and 5a's row with L_I^TW has 67.51/71.96",
        ),
    ],
)

PAPER_FIGURES: tuple[PaperFigure, ...] = (*_TABLE1, *_TABLE2, *_TABLE3, *_TABLE4, *_TABLE5A, *_TABLE5B)


def paper_miou(
    dataset: str,
    backbone: str,
    method: str,
    partition: str,
    table: str | None = None,
    variant: str | None = None,
) -> PaperFigure | None:
    """The paper's figure for one method, backbone and partition, or None when it reports none.

    MGD at 1/8 with ResNet-18 is in Table 1 or 3 and again in Tables 4 and 5: a lookup that matches
    more than one figure raises rather than pick one, so pass ``table`` (and, in Tables 4–5, ``variant``;
    ``variant=""`` selects the method-comparison rows of Tables 1–3).
    """
    found = [
        f
        for f in PAPER_FIGURES
        if (f.dataset, f.backbone, f.method, f.partition) == (dataset, backbone, method, partition)
        and (table is None or f.table == table)
        and (variant is None or f.variant == variant)
    ]
    if len(found) > 1:
        where = ", ".join(f"{f.table}" + (f" variant {f.variant!r}" if f.variant else "") for f in found)
        raise ValueError(
            f"the paper reports {method} {backbone} {dataset} {partition} more than once ({where}): "
            "pass table= (and variant=) to choose"
        )
    return found[0] if found else None


def paper_table(dataset: str, backbone: str) -> dict[str, dict[str, float]]:
    """method → partition → mIoU of the rows of ``dataset``'s comparison table (Table 1 for "voc", 2 for
    "voc_pseudoseg", 3 for "cityscapes") whose backbone is ``backbone``; a teacher is under
    "cps_teacher" with its own backbone. Empty when the paper has no such row."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r}: the paper's tables are {DATASETS}")
    out: dict[str, dict[str, float]] = {}
    for f in PAPER_FIGURES:
        if f.dataset == dataset and f.backbone == backbone and not f.variant:
            out.setdefault(f.method, {})[f.partition] = f.miou
    return out
