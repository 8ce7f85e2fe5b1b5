"""``mgd-ray compare``: the best configuration, mIoU and cost of several studies of one tracking store,
side by side, as a markdown table and the paper's Fig. 1 across studies (mIoU against GFLOPs).

Every figure is read back from MLflow (``records``): MGD is the study's best searched trial and its
seed repeats, each baseline its runs over seeds, all at their last evaluation, as in each study's
own report; the student's cost is what that report logged (``student/gflops``, ``student/params_m``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from mgd_ray import tracking
from mgd_ray.plots import plot_miou_vs_cost
from mgd_ray.study.records import StudyRecord, find_study_run, load_record
from mgd_ray.study.report import fmt_ms, mean_std

GFLOPS_METRIC = "student/gflops"
PARAMS_METRIC = "student/params_m"


@dataclass
class Compared:
    """One study as ``compare`` shows it."""

    study: str
    run_id: str
    data: str  # dataset and label budget
    student: str
    params_m: float | None
    gflops: float | None
    crop: int
    config: dict
    mgd: list[float] = field(default_factory=list)  # val mIoU: best trial, then its repeats
    mgd_test: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    baselines_test: dict[str, list[float]] = field(default_factory=dict)
    # MGD's own student where the study searched it (its best trial's architecture and cost), else the above
    mgd_student: str | None = None
    mgd_params_m: float | None = None
    mgd_gflops: float | None = None


def compared(record: StudyRecord) -> Compared:
    study, results = record.study, record.results
    data = study.data
    budget = (
        f"{data.labeled} labels"
        if data.labeled
        else (f"list {data.labeled_list.name}" if data.labeled_list else data.partition)
    )
    row = Compared(
        study=study.name,
        run_id=record.run_id,
        data=f"{data.dataset} {budget}",
        student=f"{study.student.backbone} (OS {study.student.output_stride})",
        params_m=record.metric(PARAMS_METRIC),
        gflops=record.metric(GFLOPS_METRIC),
        crop=data.crop_size,
        config=results.best["params"] if results.best else {},
        mgd=results.mgd,
        mgd_test=results.mgd_test,
        baselines=results.baselines,
        baselines_test=results.baselines_test,
    )
    return replace(row, **_searched_student(results.best))


def _searched_student(best: dict | None) -> dict:
    """The best trial's student and cost, when its study searched the student (its run records them)."""
    if not best or not best.get("architecture"):
        return {}
    cost = best.get("cost", {})
    return {"mgd_student": best["architecture"], "mgd_params_m": cost.get("params_m"), "mgd_gflops": cost.get("gflops")}


def _cost(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_markdown(rows: list[Compared], uri: str) -> str:
    """One row per study (MGD's best configuration), then one per baseline of each study."""
    tested = any(r.mgd_test or r.baselines_test for r in rows)
    head = "| study | data | student | params (M) | GFLOPs (crop) | method | val mIoU (%) |"
    rule = "|---|---|---|---|---|---|---|"
    if tested:
        head, rule = head + " test mIoU (%) |", rule + "---|"
    lines = [f"# Studies compared (`{uri}`)", "", head, rule]
    for r in rows:
        mgd = (r.mgd_student, r.mgd_params_m, r.mgd_gflops) if r.mgd_student else (r.student, r.params_m, r.gflops)
        entries = [("MGD (best configuration)", r.mgd, r.mgd_test, *mgd)]
        entries += [
            (name, vals, r.baselines_test.get(name, []), r.student, r.params_m, r.gflops)
            for name, vals in r.baselines.items()
        ]
        for method, val, test, student, params_m, gflops in entries:
            cost = f"{_cost(gflops)} ({r.crop}²)"
            line = f"| {r.study} | {r.data} | {student} | {_cost(params_m)} | {cost} | {method} | {fmt_ms(val)} |"
            lines.append(line + (f" {fmt_ms(test)} |" if tested else ""))
    lines += ["", "Best configurations:", ""]
    for r in rows:
        config = json.dumps(r.config, sort_keys=True) if r.config else "no finished trial"
        lines.append(f"- `{r.study}` (parent run `{r.run_id}`): `{config}`")
    lines += [
        "",
        "mIoU at each run's last evaluation, mean ± std over the study's seeds (MGD: the best searched trial, then its "
        "repeats). A study that ran one seed has no spread: its MGD figure is the best of its searched trials on val.",
    ]
    return "\n".join(lines) + "\n"


def compare_points(rows: list[Compared]) -> list[dict]:
    """The figure's points: each study's MGD and baselines at its student's GFLOPs (mean val mIoU)."""
    points = []
    for r in rows:
        mgd_gflops = r.mgd_gflops if r.mgd_student else r.gflops
        if r.mgd and mgd_gflops is not None:
            points.append({"name": f"{r.study}: MGD", "kind": "mgd", "miou": mean_std(r.mgd)[0], "gflops": mgd_gflops})
        if r.gflops is None:
            continue
        for name, vals in r.baselines.items():
            points.append(
                {"name": f"{r.study}: {name}", "kind": "baseline", "miou": mean_std(vals)[0], "gflops": r.gflops}
            )
    return points


def write_compare(uri: str, refs: list[str], out: Path) -> tuple[str, list[Path]]:
    """Read the studies ``refs`` name from ``uri``; write ``compare.md`` (and ``compare.png`` when the
    studies logged their cost) under ``out``; return the markdown and the files written."""
    client = tracking.client_for(uri)
    runs = [find_study_run(client, ref, uri) for ref in refs]  # every name is found before anything is read
    rows = [compared(load_record(client, uri, run)) for run in runs]
    text = compare_markdown(rows, uri)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.md"]
    files[0].write_text(text)
    points = compare_points(rows)
    if points:
        files.append(plot_miou_vs_cost(points, out / "compare.png", title="Studies: val mIoU against student GFLOPs"))
    return text, files
