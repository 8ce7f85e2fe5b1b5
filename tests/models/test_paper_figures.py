"""The paper's mIoU figures against a second transcription of its Tables 1–5, typed here from the paper."""

from __future__ import annotations

from collections import Counter

import pytest

from mgd_ray.models.backbones import BACKBONES
from mgd_ray.models.paper_figures import PAPER_FIGURES, PaperFigure, paper_miou, paper_table

ORDER = ("1/16", "1/8", "1/4", "1/2")

# (method, backbone): the row's four figures, 1/16 1/8 1/4 1/2, as the paper prints them.
TABLE1_VOC = {
    ("cps_teacher", "resnet101"): "73.98 76.43 77.61 78.64",
    ("cps_teacher", "wide_resnet50_2"): "68.17 71.38 74.78 75.85",
    ("supervised", "resnet18"): "42.17 55.65 62.52 65.39",
    ("mean_teacher", "resnet18"): "44.61 56.62 61.79 66.48",
    ("cps", "resnet18"): "47.13 60.05 65.89 68.69",
    ("kd", "resnet18"): "56.37 62.01 66.23 68.55",
    ("cwd", "resnet18"): "50.45 58.71 63.96 65.82",
    ("mgd", "resnet18"): "66.86 68.29 69.71 71.59",
    ("supervised", "mobilenet_v2"): "46.02 46.66 48.19 49.61",
    ("mean_teacher", "mobilenet_v2"): "45.11 47.20 49.15 49.63",
    ("cps", "mobilenet_v2"): "46.57 48.75 49.94 50.52",
    ("kd", "mobilenet_v2"): "47.99 49.30 50.07 50.68",
    ("cwd", "mobilenet_v2"): "46.13 47.45 48.89 49.70",
    ("mgd", "mobilenet_v2"): "50.95 52.27 53.92 55.88",
}
TABLE2_PSEUDOSEG = {
    ("cps_teacher", "resnet101"): "64.07 67.42 71.71 75.88",
    ("cps_teacher", "wide_resnet50_2"): "60.01 63.32 67.84 72.03",
    ("supervised", "resnet18"): "15.54 22.43 35.78 51.47",
    ("mean_teacher", "resnet18"): "12.58 18.15 33.71 50.02",
    ("cps", "resnet18"): "24.53 36.19 47.61 56.85",
    ("mgd", "resnet18"): "58.03 61.94 64.97 67.40",
}
TABLE3_CITYSCAPES = {
    ("cps_teacher", "resnet101"): "74.72 77.62 78.85 79.58",
    ("cps_teacher", "wide_resnet50_2"): "72.56 75.41 77.68 78.37",
    ("supervised", "resnet18"): "55.39 60.71 67.51 69.83",
    ("mean_teacher", "resnet18"): "56.92 63.61 67.46 70.38",
    ("cps", "resnet18"): "59.43 67.35 70.64 73.81",
    ("kd", "resnet18"): "58.10 64.62 69.35 71.76",
    ("cwd", "resnet18"): "55.88 61.47 67.80 70.02",
    ("mgd", "resnet18"): "70.91 72.65 74.42 75.40",
    ("supervised", "mobilenet_v2"): "50.06 51.97 54.03 56.86",
    ("mean_teacher", "mobilenet_v2"): "51.10 53.85 56.21 57.25",
    ("cps", "mobilenet_v2"): "53.34 55.61 57.98 59.20",
    ("kd", "mobilenet_v2"): "53.45 54.89 55.28 57.90",  # printed "KD [46] ResNet-18"
    ("cwd", "mobilenet_v2"): "51.52 52.64 54.37 57.01",  # printed "CWD [38] ResNet-18"
    ("mgd", "mobilenet_v2"): "58.00 59.27 61.36 62.55",
}
COMPARISONS = [
    ("Table 1", "voc", TABLE1_VOC),
    ("Table 2", "voc_pseudoseg", TABLE2_PSEUDOSEG),
    ("Table 3", "cityscapes", TABLE3_CITYSCAPES),
]
# Tables 4 and 5 (MGD, ResNet-18, 1/8): variant → (VOC, Cityscapes).
ABLATIONS = {
    "Table 4": {
        "T_D": (64.85, 69.63),
        "T_W": (64.36, 68.98),
        "T_D+T_D": (66.14, 71.19),
        "T_W+T_W": (65.78, 70.92),
        "T_D+T_W": (68.29, 72.65),
    },
    "Table 5a": {
        "L_Sup": (55.65, 60.71),
        "L_Sup+L_P": (63.61, 69.05),
        "L_Sup+L_P+L_I^TD": (66.01, 71.03),
        "L_Sup+L_P+L_R^TW": (66.02, 71.15),
        "L_Sup+L_P+L_I^TD+L_R^TW": (68.29, 72.65),
        "L_Sup+L_P+L_I^TD+L_I^TW+L_R^TD+L_R^TW": (67.51, 71.96),
    },
    "Table 5b": {
        "L_Sup+L_P^l": (58.24, 63.98),
        "L_Sup+L_P^l+L_P^u+L_I^TD+L_I^TW+L_R^TW": (68.29, 72.65),
    },
}


def figure(table: str, dataset: str, backbone: str, method: str, partition: str, variant: str = "") -> PaperFigure:
    found = paper_miou(dataset, backbone, method, partition, table=table, variant=variant)
    assert found is not None, (table, dataset, backbone, method, partition, variant)
    return found


@pytest.mark.parametrize(
    ("table", "dataset", "backbone", "method", "partition", "miou"),
    [
        ("Table 1", "voc", "resnet18", "mgd", "1/16", 66.86),
        ("Table 1", "voc", "resnet18", "mgd", "1/2", 71.59),
        ("Table 1", "voc", "mobilenet_v2", "supervised", "1/8", 46.66),
        ("Table 1", "voc", "resnet101", "cps_teacher", "1/16", 73.98),
        ("Table 1", "voc", "wide_resnet50_2", "cps_teacher", "1/2", 75.85),
        ("Table 2", "voc_pseudoseg", "resnet18", "cps", "1/4", 47.61),
        ("Table 2", "voc_pseudoseg", "resnet18", "mgd", "1/16", 58.03),
        ("Table 3", "cityscapes", "mobilenet_v2", "mgd", "1/16", 58.00),
        ("Table 3", "cityscapes", "resnet18", "mgd", "1/16", 70.91),
    ],
)
def test_spot_figures(table, dataset, backbone, method, partition, miou):
    assert figure(table, dataset, backbone, method, partition).miou == miou


@pytest.mark.parametrize(("table", "dataset", "expected"), COMPARISONS, ids=[t for t, _, _ in COMPARISONS])
def test_comparison_tables_match_the_paper(table, dataset, expected):
    rows = {(f.method, f.backbone) for f in PAPER_FIGURES if f.table == table}
    assert rows == set(expected)
    for (method, backbone), printed in expected.items():
        values = [float(v) for v in printed.split()]
        got = [figure(table, dataset, backbone, method, p).miou for p in ORDER]
        assert got == values, (method, backbone)


@pytest.mark.parametrize("table", sorted(ABLATIONS))
def test_ablation_tables_match_the_paper(table):
    figures = [f for f in PAPER_FIGURES if f.table == table]
    assert {f.variant for f in figures} == set(ABLATIONS[table])
    assert {(f.method, f.backbone, f.partition) for f in figures} == {("mgd", "resnet18", "1/8")}
    for variant, (voc, city) in ABLATIONS[table].items():
        assert figure(table, "voc", "resnet18", "mgd", "1/8", variant).miou == voc
        assert figure(table, "cityscapes", "resnet18", "mgd", "1/8", variant).miou == city


def test_table4_complementary_teachers():
    assert figure("Table 4", "voc", "resnet18", "mgd", "1/8", "T_D+T_W").miou == 68.29


def test_counts_per_table():
    assert Counter(f.table for f in PAPER_FIGURES) == {
        "Table 1": 14 * 4,
        "Table 2": 6 * 4,
        "Table 3": 14 * 4,
        "Table 4": 5 * 2,
        "Table 5a": 6 * 2,
        "Table 5b": 2 * 2,
    }


def test_every_figure_is_well_formed():
    for f in PAPER_FIGURES:
        assert f.partition in ORDER
        assert f.dataset in ("voc", "voc_pseudoseg", "cityscapes")
        assert f.method in ("supervised", "mean_teacher", "cps", "kd", "cwd", "mgd", "cps_teacher")
        assert f.backbone in BACKBONES
        assert (f.method == "cps_teacher") == (f.backbone in ("resnet101", "wide_resnet50_2"))
        assert 0 < f.miou < 100 and round(f.miou, 2) == f.miou
        assert f.row and f.table


def test_no_duplicate_figure():
    keys = Counter((f.table, f.dataset, f.backbone, f.method, f.variant, f.partition) for f in PAPER_FIGURES)
    assert [k for k, n in keys.items() if n > 1] == []


def test_table3_typo_rows_sit_in_the_mobilenet_block_with_a_note():
    for method in ("kd", "cwd"):
        f = figure("Table 3", "cityscapes", "mobilenet_v2", method, "1/8")
        assert "ResNet-18" in f.row and "ResNet-18" in f.note
        assert figure("Table 3", "cityscapes", "resnet18", method, "1/8").note == ""
    assert figure("Table 3", "cityscapes", "mobilenet_v2", "kd", "1/16").miou == 53.45


def test_a_figure_reported_twice_asks_for_its_table():
    with pytest.raises(ValueError, match="Table 1.*Table 4"):
        paper_miou("voc", "resnet18", "mgd", "1/8")
    with pytest.raises(ValueError, match="T_D\\+T_W"):
        paper_miou("voc", "resnet18", "mgd", "1/8", table="Table 4")
    assert paper_miou("voc", "resnet18", "mgd", "1/8", variant="").miou == 68.29
    assert paper_miou("voc", "resnet18", "mgd", "1/16").miou == 66.86  # only Table 1 has it


def test_a_figure_the_paper_lacks_is_none():
    assert paper_miou("voc_pseudoseg", "resnet18", "kd", "1/8") is None  # Table 2 has no KD row
    assert paper_miou("voc_pseudoseg", "mobilenet_v2", "mgd", "1/8") is None
    assert paper_miou("voc", "resnet18", "mgd", "1/16", table="Table 4") is None
    assert paper_miou("voc", "resnet34", "mgd", "1/8") is None


def test_paper_table_is_the_comparison_table_of_one_backbone():
    r18 = paper_table("voc", "resnet18")
    assert set(r18) == {"supervised", "mean_teacher", "cps", "kd", "cwd", "mgd"}
    assert r18["mgd"] == {"1/16": 66.86, "1/8": 68.29, "1/4": 69.71, "1/2": 71.59}
    assert paper_table("voc", "resnet101") == {"cps_teacher": {"1/16": 73.98, "1/8": 76.43, "1/4": 77.61, "1/2": 78.64}}
    assert paper_table("cityscapes", "wide_resnet50_2")["cps_teacher"]["1/8"] == 75.41
    assert paper_table("cityscapes", "mobilenet_v2")["cwd"]["1/2"] == 57.01
    assert set(paper_table("voc_pseudoseg", "resnet18")) == {"supervised", "mean_teacher", "cps", "mgd"}
    assert paper_table("voc_pseudoseg", "mobilenet_v2") == {}
    with pytest.raises(ValueError, match="dataset"):
        paper_table("ade20k", "resnet18")
