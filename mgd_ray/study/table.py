"""A whole table as one study: ``data.partitions`` expands a study into one study per partition (the
cells of the paper's Table 1), run one after the other, and one table of them, laid out as the paper's:
rows are methods (teachers, baselines, MGD), columns partitions, cells mean ± std over seeds.

Each cell is an ordinary study (``<name>-1_16``, ...) in the table's MLflow experiment, with its own
report, and its teachers trained once for its partition and found again by every later study. The
table reads the cells back from MLflow (``records``), as ``mgd-ray compare`` does; with
``report.paper`` the paper's own figures (``models.paper_figures``) sit beside each cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from mgd_ray.models.paper_figures import paper_table
from mgd_ray.study.config import StudyConfig
from mgd_ray.study.records import StudyRecord
from mgd_ray.study.report import mean_std


def cell_name(name: str, partition: str) -> str:
    """The study name of one partition's cell: ``voc-r18`` and ``1/16`` → ``voc-r18-1_16``."""
    return f"{name}-{partition.replace('/', '_')}"


def table_cells(study: StudyConfig) -> list[StudyConfig]:
    """One study per ``data.partitions`` entry, in the table's order and MLflow experiment."""
    mlflow = study.mlflow.model_copy(update={"experiment": study.experiment})
    return [
        study.model_copy(
            update={
                "name": cell_name(study.name, p),
                "data": study.data.model_copy(update={"partition": p, "partitions": ()}),
                "mlflow": mlflow,
                "report": study.report.model_copy(update={"paper": None}),  # the table sets the paper beside it
            }
        )
        for p in study.data.partitions
    ]


@dataclass
class TableRow:
    """One method across the partitions: its val (and test) mIoU per partition, one value per seed."""

    label: str
    kind: str  # teacher | baseline | mgd
    paper_method: str  # the method's id in models.paper_figures
    backbone: str
    val: dict[str, list[float]] = field(default_factory=dict)
    test: dict[str, list[float]] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)  # partition → the student the search chose there


def table_rows(study: StudyConfig, records: dict[str, StudyRecord]) -> list[TableRow]:
    """The table's rows from each partition's record: teachers, then baselines, then MGD."""
    rows = [
        TableRow(f"{name} ({spec.model.backbone})", "teacher", "cps_teacher", spec.model.backbone)
        for name, spec in study.teachers.items()
    ]
    rows += [TableRow(b.name, "baseline", b.method, study.student.backbone) for b in study.baselines]
    searched = "searched (per cell)" if study.search.searches_student else study.student.backbone
    rows.append(TableRow("MGD (best searched configuration)", "mgd", "mgd", searched))
    for partition, record in records.items():
        results = record.results
        for row, name in zip(rows[: len(study.teachers)], study.teachers, strict=True):
            for split, into in (("val", row.val), ("test", row.test)):
                value = record.metric(f"teacher/{name}/{split}_mIoU")
                into[partition] = [] if value is None else [value]
        for row, baseline in zip(rows[len(study.teachers) : -1], study.baselines, strict=True):
            row.val[partition] = results.baselines.get(baseline.name, [])
            row.test[partition] = results.baselines_test.get(baseline.name, [])
        rows[-1].val[partition] = results.mgd
        rows[-1].test[partition] = results.mgd_test
        if study.search.searches_student and results.best is not None:
            rows[-1].chosen[partition] = results.best["params"].get("student", "?")
    return rows


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}" + (f" (n={len(values)})" if len(values) > 1 else "")


def table_markdown(study: StudyConfig, rows: list[TableRow], run_ids: dict[str, str]) -> str:
    """The table (val; test too when the data has one), the paper's figures beside each cell when
    ``report.paper`` names its table, and the cells' parent runs."""
    partitions = list(study.data.partitions)
    paper = study.report.paper
    lines = [f"# Table `{study.name}`", "", study.description.strip(), ""]
    splits = [("val", "val mIoU (%)")]
    if any(v for r in rows for v in r.test.values()):
        splits.append(("test", "test mIoU (%), read once per model after the search chose on val"))
    for split, title in splits:
        head = "| method | backbone |"
        rule = "|---|---|"
        for p in partitions:
            head += f" {p} |" + (" paper |" if paper else "")
            rule += "---|" + ("---|" if paper else "")
        lines += [f"## {title}, mean ± std over seeds", "", head, rule]
        for r in rows:
            figures = paper_table(paper, r.backbone).get(r.paper_method, {}) if paper else {}
            cells = ""
            for p in partitions:
                chosen = f" ({r.chosen[p]})" if p in r.chosen else ""
                cells += f" {_cell(getattr(r, split).get(p, []))}{chosen} |"
                if paper:
                    cells += f" {figures[p]:.2f} |" if p in figures else " – |"
            lines.append(f"| {r.label} | {r.backbone} |{cells}")
        lines.append("")
    if paper:
        lines += [
            f"`paper`: the figure the paper reports for the same method, backbone and partition ({paper}; "
            "mgd_ray/models/paper_figures.py names each one's table and row), at the paper's scale: "
            "a laptop study's figures are not expected to reach them, their ordering is the comparison.",
            "",
        ]
    lines += ["Cells (each a study with its own report):", ""]
    lines += [f"- {p}: `{cell_name(study.name, p)}`, parent run `{run_ids[p]}`" for p in partitions]
    return "\n".join(lines) + "\n"


def plot_table(study: StudyConfig, rows: list[TableRow], out_png: Path) -> Path:
    """The paper's Fig. 3 for this study: val mIoU against the partition, one line per method."""
    partitions = list(study.data.partitions)
    fig = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(partitions)))
    for r in rows:
        stats = [mean_std(r.val.get(p, [])) for p in partitions]
        means = [100 * m for m, _ in stats]
        stds = [100 * s for _, s in stats]
        style = {"teacher": ":", "baseline": "--", "mgd": "-"}[r.kind]
        ax.errorbar(x, means, yerr=stds, ls=style, marker="o", capsize=3, label=r.label)
    ax.set_xticks(x, partitions)
    ax.set_xlabel("labeled partition")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{study.name}: val mIoU against the label budget")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def write_table(study: StudyConfig, records: dict[str, StudyRecord], out: Path) -> tuple[str, list[Path]]:
    """``table.md`` and ``table.png`` under ``out``, from each partition's record."""
    rows = table_rows(study, records)
    text = table_markdown(study, rows, {p: r.run_id for p, r in records.items()})
    out.mkdir(parents=True, exist_ok=True)
    md = out / "table.md"
    md.write_text(text)
    return text, [md, plot_table(study, rows, out / "table.png")]
