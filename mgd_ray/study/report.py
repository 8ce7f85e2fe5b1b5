"""The end of a study: a report that says honestly where MGD stands, saved to disk and to MLflow.

Everything is read back from MLflow (``results``): trials with their params, final val mIoU,
evaluations run and state; baselines and the best configuration as mean ± std over seeds;
teachers; params/FLOPs of student and teachers; Optuna's plots and the mIoU–FLOPs picture (the
paper's Fig. 1) for this study; the best student logged as a served, registered model. Each
section is a function that returns its lines.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mgd_ray import tracking
from mgd_ray.data.datasets import voc_palette
from mgd_ray.data.stream import JobData, load_job_data
from mgd_ray.export import export_onnx
from mgd_ray.final_eval import example_predictions, load_examples, load_model
from mgd_ray.models.complexity import latency_ms, segmenter_cost
from mgd_ray.plots import COST_LABELS, overlay_grid, plot_miou_vs_cost
from mgd_ray.serving import log_served_model
from mgd_ray.study.costs import COST_KEYS, COST_UNITS, architecture_name, architectures
from mgd_ray.study.plan import Plan
from mgd_ray.study.results import (
    METRIC,
    StudyResults,
    baselines_student_best,
    final_miou,
    finalize_stopped,
    front_members,
    study_results,
    trial_cost,
)
from mgd_ray.study.search import optuna_study_from


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f} (n={len(values)})" if values else "n/a"


def write_report(plan: Plan, state: dict[str, Any]) -> Path:
    """Write ``report.md`` (+ plots) under the study's folder and log them to the parent run."""
    study = plan.study
    client = tracking.client_for(plan.tracking_uri)
    finalize_stopped(plan)
    results = study_results(plan)
    data = load_job_data(study.data)
    size = study.data.crop_size
    student_params, student_gflops = segmenter_cost(study.student, data.num_classes, size)
    lines = _header_section(plan, data)
    lines += _pretrain_section(state)
    teacher_lines, teachers = _teachers_section(plan, state, data.num_classes)
    lines += teacher_lines
    lines += _student_section(plan, state, results, student_params, student_gflops)
    if study.search.searches_student:  # like for like: the baselines' student, the front has the others
        label = f"MGD (best trial on the baselines' student, {architecture_name(study.student)})"
        lines += _comparison_section(_beside_baselines(plan, results), teachers, label)
    else:
        lines += _comparison_section(results, teachers)
    lines += _trials_section(results)
    lines += _warm_start_section(plan, results)
    out_dir = plan.root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    student_latency = _latency(plan, "student", study.student, data.num_classes)
    if study.search.searches_student:
        lines += _front_section(plan, results, data.num_classes)
    pictures = _plots(plan, results, teachers, (student_gflops, student_latency), out_dir)
    if pictures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pictures] + [""]
    if results.best is not None:
        best_lines, page = _best_student_section(plan, results, data, out_dir, student_params, student_gflops)
        lines += best_lines
        pictures.append(page)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    tracking.log_files(client, plan.parent_run_id, [report, *pictures], "report")
    # Read back by mgd-ray compare and a study's table (``records``): the student's cost, the teachers'.
    figures = {"student/params_m": student_params, "student/gflops": student_gflops}
    for name, point in zip(study.teachers, teachers, strict=True):
        figures[f"teacher/{name}/gflops"] = point["gflops"]
        figures |= {f"teacher/{name}/{split}_mIoU": point[key] for split, key in (("val", "miou"), ("test", "test"))}
    tracking.log_metrics(client, plan.parent_run_id, {k: v for k, v in figures.items() if v is not None}, step=0)
    if results.best is not None:
        tracking.log_metrics(client, plan.parent_run_id, {"best/val_mIoU": results.best["miou"]}, step=0)
    print("\n".join(lines))
    return report


def _latency(plan: Plan, name: str, model: Any, num_classes: int) -> float:
    """A model's latency as the study measured it (``searcher.latency_device``, ``reference_costs``),
    else measured here in the driver, 1 thread: every point of one figure is measured alike."""
    measured = plan.reference_costs.get(name)
    if measured is not None and measured.latency_ms is not None:
        return measured.latency_ms
    return latency_ms(model, num_classes, plan.study.data.crop_size)


def _header_section(plan: Plan, data: JobData) -> list[str]:
    study = plan.study
    return [
        f"# Study `{study.name}`",
        "",
        study.description.strip(),
        "",
        f"MLflow: `{plan.tracking_uri}`, experiment `{study.experiment}`, parent run `{plan.parent_run_id}`.",
        "",
        _splits_line(plan, data),
        "",
    ]


def _splits_line(plan: Plan, data: JobData) -> str:
    """What each split is, with its image count: every figure below names the split it was measured on."""
    cfg = plan.study.data
    val, test = len(data.val), len(data.test) if data.test is not None else 0
    if cfg.dataset in ("voc", "cityscapes"):
        if cfg.selection is not None:
            val_text = f"{val} unlabeled training images held out as a selection set (`split_seed` {cfg.split_seed})"
            test_text = f"the official val set ({test} images)"
        else:
            val_text, test_text = f"the official val set ({val} images)", "none: the paper's protocol reports on val"
    elif cfg.dataset == "folder":
        carved = f"carved from the labeled images (`split_seed` {cfg.split_seed})"
        val_text = f"{val} images " + (f"listed in `{cfg.val}`" if isinstance(cfg.val, Path) else carved)
        if cfg.test is None:
            test_text = "none"
        else:
            test_text = f"{test} images " + (f"listed in `{cfg.test}`" if isinstance(cfg.test, Path) else carved)
    else:
        val_text = f"{val} generated images"
        test_text = f"{test} generated images" if test else "none"
    return (
        f"Data: {cfg.dataset}, {len(data.labeled)} labeled and {len(data.unlabeled or [])} unlabeled training images; "
        f"val (the search and ASHA): {val_text}; test (the final evaluation only): {test_text}."
    )


def _pretrain_section(state: dict[str, Any]) -> list[str]:
    """The backbones pretrained on the built-in corpus (``pretrained: builtin``), with their accuracy."""
    pretrained = state.get("pretrained") or {}
    if not pretrained:
        return []
    lines = [
        "## Pretraining (the built-in corpus: the stand-in for ImageNet weights)",
        "",
        "| backbone | source | label accuracy (%) | mAP (%) |",
        "|---|---|---|---|",
    ]
    for label, entry in pretrained.items():
        lines.append(
            f"| {label} | {entry['source']} | {_pct(entry.get('pretrain/label_accuracy'))} | {_pct(entry.get('pretrain/mAP'))} |"
        )
    return lines + [""]


def _teachers_section(plan: Plan, state: dict[str, Any], num_classes: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The teachers' table, and each teacher as a point of the mIoU–cost figures."""
    client = tracking.client_for(plan.tracking_uri)
    size = plan.study.data.crop_size
    points, rows = [], []
    for name, spec in plan.study.teachers.items():
        info = state.get("teachers", {}).get(name, {})
        miou = test = None
        if "run_id" in info:
            miou = final_miou(tracking.metric_history(client, info["run_id"], METRIC))
            test = final_miou(tracking.metric_history(client, info["run_id"], "test/mIoU"))
        params_m, gflops = segmenter_cost(spec.model, num_classes, size)
        points.append(
            {
                "name": f"teacher {name} ({spec.model.backbone})",
                "kind": "teacher",
                "miou": miou,
                "test": test,
                "gflops": gflops,
                "latency_ms": _latency(plan, f"teacher {name}", spec.model, num_classes),
            }
        )
        rows.append((name, spec.model.backbone, info.get("source", "?"), miou, test, params_m, gflops))
    tested = any(point["test"] is not None for point in points)
    test_head, test_rule = (" test mIoU |", "---|") if tested else ("", "")
    lines = [
        "## Teachers",
        "",
        f"| teacher | backbone | source | val mIoU |{test_head} params (M) | GFLOPs |",
        f"|---|---|---|---|{test_rule}---|---|",
    ]
    for name, backbone, source, miou, test, params_m, gflops in rows:
        test_cell = f" {_pct(test)} |" if tested else ""
        lines.append(f"| {name} | {backbone} | {source} | {_pct(miou)} |{test_cell} {params_m:.2f} | {gflops:.2f} |")
    return lines, points


def _student_section(
    plan: Plan, state: dict[str, Any], results: StudyResults, params_m: float, gflops: float
) -> list[str]:
    """The student's size, and what the teacher-signal cache cost and served."""
    study = plan.study
    size = study.data.crop_size
    lines = [
        "",
        f"Student: {study.student.backbone}, {params_m:.2f} M params, {gflops:.2f} GFLOPs at {size}×{size}.",
        "",
    ]
    cache = state.get("teacher_cache") or {}
    if not cache.get("used"):
        return lines
    served = [r for r in results.rows if r["kind"] in ("trial", "repeat")]
    hits = sum(1 for r in served if r.get("cache") == "hit")
    if "bytes_per_epoch" in cache:
        size_text = (
            f"{cache['bytes_per_epoch'] / 2**20:.2f} MiB per epoch ({cache['bytes_per_training_image'] / 1024:.1f} KiB per "
            f"training image), built in {cache['seconds']:.0f} s"
        )
    else:
        size_text = "reused from an earlier run of this study"
    live = (
        " (the others ran their teachers live: see their tag `mgd_ray.teacher_cache_reason`)."
        if hits < len(served)
        else "."
    )
    return lines + [f"Teacher-signal cache: {size_text}; it served {hits} of {len(served)} MGD runs" + live, ""]


def _comparison_section(
    results: StudyResults, teachers: list[dict[str, Any]], label: str = "MGD (best searched configuration)"
) -> list[str]:
    """MGD's best configuration against each baseline, mean ± std over seeds, and the verdict: on the
    test split when the data has one (val chose the configuration), else on val."""
    if not (results.mgd_test or results.baselines_test):
        lines = [
            "## MGD against the baselines (val mIoU at the last evaluation, mean ± std over seeds)",
            "",
            "| method | val mIoU (%) |",
            "|---|---|",
        ]
        lines += [f"| {name} | {fmt_ms(values)} |" for name, values in results.baselines.items()]
        lines.append(f"| {label} | {fmt_ms(results.mgd)} |")
        searched = sum(r["miou"] is not None for r in results.trials)
        return (
            lines
            + _baseline_legend(results.baselines)
            + ["", _verdict(results.mgd, results.baselines, teachers, searched), ""]
        )
    lines = [
        "## MGD against the baselines (mIoU at the last evaluation, mean ± std over seeds)",
        "",
        "The search, ASHA and the choice of configuration saw val only; test was read once, by this final evaluation.",
        "",
        "| method | val mIoU (%) | test mIoU (%) |",
        "|---|---|---|",
    ]
    for name, values in results.baselines.items():
        lines.append(f"| {name} | {fmt_ms(values)} | {fmt_ms(results.baselines_test.get(name, []))} |")
    lines.append(f"| {label} | {fmt_ms(results.mgd)} | {fmt_ms(results.mgd_test)} |")
    on_test = [t | {"miou": t["test"]} for t in teachers]
    return (
        lines
        + _baseline_legend(results.baselines)
        + ["", _verdict(results.mgd_test, results.baselines_test, on_test, split="test"), ""]
    )


def _beside_baselines(plan: Plan, results: StudyResults) -> StudyResults:
    """The figures to set beside the baselines: in a study that searches the student, MGD's best trial
    on the baselines' own student (the overall best, perhaps a larger student, is in the front)."""
    same = baselines_student_best(plan, results.trials)
    if same is None:
        return replace(results, mgd=[], mgd_test=[])
    return replace(results, mgd=[same["miou"]], mgd_test=[same["test"]] if same["test"] is not None else [])


def _baseline_legend(baselines: dict[str, list[float]]) -> list[str]:
    """What a KD/CWD row distilled on: the paper's baselines take the labeled images only (Sec. 1, 3.3)."""
    if not any(name.startswith(("kd[", "cwd[")) for name in baselines):
        return []
    return [
        "",
        "kd[T] and cwd[T] distil teacher T on the labeled images only, as the paper's baselines do; "
        "`+unlabeled` rows also distil on MGD's CutMix-ed unlabeled images (a stronger baseline than the paper's).",
    ]


def _trials_section(results: StudyResults) -> list[str]:
    """One row per search trial: its parameters, val mIoU at its last evaluation, evaluations and state."""
    names = sorted({k for r in results.trials for k in r["params"]})
    lines = ["## Search trials", "", "| trial | " + " | ".join(names) + " | val mIoU | evaluations | state |"]
    lines.append("|---" * (len(names) + 4) + "|")
    for r in results.trials:
        values = " | ".join(_fmt(r["params"].get(k)) for k in names)
        lines.append(f"| {r['name']} | {values} | {_pct(r['miou'])} | {r['evals']} | {r['state']} |")
    best = results.best
    if best is not None:
        lines += [
            "",
            f"Best configuration: `{json.dumps(best['params'], sort_keys=True)}` ({_pct(best['miou'])} %).",
            "",
        ]
    return lines


def _front_section(plan: Plan, results: StudyResults, num_classes: int) -> list[str]:
    """The Pareto front of the searched students: each member registered in MLflow as a version of
    ``<study>-front`` with its cost, under an alias that is its architecture's name."""
    study = plan.study
    kind = study.searcher.cost if study.searcher.multi_objective else "gflops"
    key = COST_KEYS[kind]
    front = front_members(plan, results.trials)
    lines = [
        f"## Pareto front: val mIoU against {COST_LABELS[key]} (the student searched among {', '.join(plan.students)})",
        "",
    ]
    excluded = sorted(set(architectures(study)) - set(plan.students))
    if excluded:
        lines += [f"Over the searcher's limits, never trained: {', '.join(excluded)}.", ""]
    if not front:
        return lines + ["No searched trial finished.", ""]
    tested = any(row["test"] is not None for row in front)  # the final evaluation tests each member
    lines += [
        "| member | val mIoU (%) |"
        + (" test mIoU (%) |" if tested else "")
        + " params (M) | GFLOPs | latency (ms) | trial | registered as |",
        "|---|---|" + ("---|" if tested else "") + "---|---|---|---|---|",
    ]
    name = f"{study.name}-front"
    for row in front:
        cost = trial_cost(row)
        uri = _register_front_member(plan, row, name, kind, cost[key], num_classes)
        latency = "n/a" if cost["latency_ms"] is None else f"{cost['latency_ms']:.2f}"
        test = f" {_pct(row['test'])} |" if tested else ""
        lines.append(
            f"| {row['architecture']} | {_pct(row['miou'])} |{test} {cost['params_m']:.2f} | {cost['gflops']:.2f} | "
            f"{latency} | {row['name']} `{json.dumps(row['params'], sort_keys=True)}` | `{uri}` |"
        )
    example = front[0]["architecture"]
    lines += [
        "",
        f"Each member is a version of `{name}` with the alias of its architecture: "
        f"`mgd-ray export models:/{name}@{example} --format onnx --out {example}.onnx --tracking-uri {plan.tracking_uri}` "
        f"and `mgd-ray predict models:/{name}@{example} ...` take it by name.",
        "",
    ]
    return lines


def _register_front_member(plan: Plan, row: dict[str, Any], name: str, kind: str, cost: float, num_classes: int) -> str:
    """Log the member's checkpoint as a served model to its trial run, register it as a version of
    ``name`` with its cost and mIoU as tags, and point the alias (its architecture) at it."""
    client = tracking.client_for(plan.tracking_uri)
    study = plan.study
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tracking.download_checkpoint(plan.tracking_uri, row["run_id"], Path(tmp))
        load_model(ckpt, num_classes, f"front member {row['architecture']}")
        card = (
            f"Pareto-front student {row['architecture']} of study {study.name}: val mIoU {100 * row['miou']:.2f}, "
            f"{cost:.4g} {COST_UNITS[kind]}; trial run {row['run_id']}, config {json.dumps(row['params'], sort_keys=True)}\n"
            "serves images: column 'image' (JPEG/PNG bytes) in, column 'mask' (class-id PNG) out"
        )
        uri = log_served_model(plan.tracking_uri, row["run_id"], ckpt, study.data.crop_size, name, card)
    version = uri.rsplit("/", 1)[1]
    tags = {
        "mgd_ray.architecture": row["architecture"],
        "mgd_ray.study": study.name,
        "mgd_ray.cost": kind,
        f"mgd_ray.cost.{kind}": repr(cost),
        "mgd_ray.val_mIoU": repr(row["miou"]),
        "mgd_ray.trial_run": row["run_id"],
    }
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    client.set_registered_model_alias(name, row["architecture"], version)
    return f"models:/{name}@{row['architecture']}"


def _warm_start_section(plan: Plan, results: StudyResults) -> list[str]:
    """Which trials ran the earlier studies' configurations (``searcher.warm_start``)."""
    if not plan.warm_start:
        return []
    seeded = [r["name"] for r in results.trials if r["params"] in plan.warm_start]
    sources = ", ".join(f"`{ref}` (run `{run_id}`)" for ref, run_id in plan.warm_start_runs.items())
    return [
        f"Warm start: {len(plan.warm_start)} configuration(s), the best finished trials of {sources}, ran first: "
        f"{', '.join(seeded) or 'no trial of this table'}.",
        "",
    ]


def _best_student_section(
    plan: Plan, results: StudyResults, data: JobData, out_dir: Path, params_m: float, gflops: float
) -> tuple[list[str], Path]:
    """The prediction page, and the best student registered in MLflow (and exported to ONNX if asked)."""
    assert results.best is not None
    page = _prediction_page(plan, results.best, results.rows, data, out_dir)
    uri = _log_best(plan, results.best, params_m, gflops, data.num_classes)
    if plan.study.report.onnx:
        onnx = "with its ONNX export beside it (`best_student_onnx/best_student.onnx`)"
    else:
        onnx = f"export it with `mgd-ray export {uri} --format onnx --out best_student.onnx --tracking-uri {plan.tracking_uri}`"
    lines = ["## Predictions on fixed val images", "", f"![{page.stem}]({page.name})", ""]
    serve = f"serve it with `mlflow models serve -m {uri} --env-manager local --host 127.0.0.1` (images in, masks out)"
    return lines + [f"Best student registered as `{uri}`: {serve}; {onnx}.", ""], page


def _verdict(
    mgd: list[float],
    baselines: dict[str, list[float]],
    teachers: list[dict[str, Any]],
    searched: int = 1,
    split: str = "val",
) -> str:
    """One honest sentence per comparison: the gap and whether it exceeds the seed-to-seed spread.

    ``mgd`` is the best searched trial, then its repeats over the other seeds; ``searched``: how
    many trials it was picked from. Without repeats it is a maximum chosen on the val split that
    scores it, which a baseline's single run is not: the sentence says so. ``split`` names the split
    of the figures when it is not val.
    """
    if not mgd:
        return "No MGD trial finished."
    m, s = mean_std(mgd)
    out = [] if split == "val" else [f"On the {split} split:"]
    for name, values in baselines.items():
        bm, bs = mean_std(values)
        gap = m - bm
        noise = max(s, bs)
        side = "above" if gap >= 0 else "below"
        if noise > 0:
            rel = "larger than" if abs(gap) > 2 * noise else "within"
            rel = f"{rel} twice the seed-to-seed spread of {100 * noise:.2f}"
        else:
            rel = "one seed each: the spread between seeds is unknown, add seeds to tell"
        out.append(f"MGD is {100 * abs(gap):.2f} mIoU {side} {name} ({rel}).")
    if searched > 1 and len(mgd) == 1:
        out.append(
            f"MGD's figure is the best of {searched} searched trials, picked on the val split that scores it, so it is "
            "optimistic against one run per baseline: more `seeds` re-run that configuration and the baselines."
        )
    for t in teachers:
        if t["miou"] is not None:
            out.append(f"The {t['name']} reaches {100 * t['miou']:.2f} mIoU at {t['gflops']:.2f} GFLOPs.")
    return " ".join(out)


def _plots(
    plan: Plan, results: StudyResults, teachers: list[dict[str, Any]], student_cost: tuple[float, float], out: Path
) -> list[Path]:
    """The paper's Fig. 1 for this study (mIoU against GFLOPs and against measured latency), Optuna's plots."""
    pictures = []
    cost = {"gflops": student_cost[0], "latency_ms": student_cost[1]}
    # A trial is at its own student's cost when the study searches the student (its run records it);
    # without measured latencies, such trials have none.
    points = [
        {"name": r["name"], "kind": "trial", "miou": r["miou"]}
        | (trial_cost(r) if plan.study.search.searches_student else cost)
        for r in results.trials
        if r["miou"] is not None
    ]
    points += [{"name": n, "kind": "baseline", "miou": mean_std(v)[0]} | cost for n, v in results.baselines.items()]
    points += [t for t in teachers if t["miou"] is not None]
    if points:
        size = plan.study.data.crop_size
        device = "GPU" if torch.cuda.is_available() else "CPU"
        searcher = plan.study.searcher
        threads = f" x{searcher.latency_threads} thread" if searcher.latency_device == "cpu" else ""
        where = f"{searcher.latency_device}{threads}" if searcher.measures_latency else f"driver {device}"
        for key, title in (
            ("gflops", f"mIoU against GFLOPs at {size}×{size}"),
            ("latency_ms", f"mIoU against latency (eager PyTorch, batch 1, {size}×{size}, {where})"),
        ):
            if not any(p.get(key) is not None for p in points if p["kind"] == "trial") and results.trials:
                continue  # a searched student without measured latency: no trial has one
            path = out / f"miou_vs_{key.removesuffix('_ms')}.png"
            plot_miou_vs_cost(points, path, cost_key=key, title=title)
            pictures.append(path)
    ostudy = optuna_study_from(results.trials, plan.study.search, list(architectures(plan.study)))
    if len(ostudy.trials) >= 2:
        # Optuna draws with pyplot: a file backend, chosen here rather than for whoever imports mgd_ray.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        makers = {"optimization_history": ovm.plot_optimization_history, "slice": ovm.plot_slice}
        if len(ostudy.trials) >= 3 and len(ostudy.trials[0].params) >= 2:
            makers["param_importances"] = ovm.plot_param_importances
        for name, make in makers.items():
            ax = make(ostudy)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            path = out / f"optuna_{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            pictures.append(path)
    return pictures


def _prediction_page(plan: Plan, best: dict[str, Any], rows: list[dict[str, Any]], data: JobData, out: Path) -> Path:
    """image | ground truth | best student | Sup-only | teachers, on the first val images."""
    models = {
        "best MGD student": tracking.download_checkpoint(plan.tracking_uri, best["run_id"], out / "_models" / "best")
    }
    sup = [r for r in rows if r["kind"] == "baseline" and r["baseline"] == "supervised" and r["state"] == "finished"]
    if sup:
        models["Sup-only"] = tracking.download_checkpoint(plan.tracking_uri, sup[0]["run_id"], out / "_models" / "sup")
    images, truths, preds = example_predictions(models, data)
    if plan.teacher_examples is not None:  # the teachers' columns, drawn once per study (stages.write_teacher_examples)
        preds |= {f"teacher {n}": maps for n, maps in load_examples(plan.teacher_examples)[2].items()}
    page = overlay_grid({"ground truth": truths} | preds, images, voc_palette(256), out / "predictions.png")
    shutil.rmtree(out / "_models", ignore_errors=True)
    return page


def _log_best(plan: Plan, best: dict[str, Any], params_m: float, gflops: float, num_classes: int) -> str:
    """Log the best student's checkpoint (and ONNX export) to the parent run; register it with a model card."""
    client = tracking.client_for(plan.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tracking.download_checkpoint(plan.tracking_uri, best["run_id"], Path(tmp))
        load_model(ckpt, num_classes, "best student")  # the checkpoint rebuilds, with the study's classes
        tracking.log_files(client, plan.parent_run_id, [ckpt], "best_student_checkpoint")
        if plan.study.report.onnx:
            onnx_file = export_onnx(ckpt, Path(tmp) / "best_student.onnx")
            tracking.log_files(client, plan.parent_run_id, [onnx_file], "best_student_onnx")
        study = plan.study
        teachers = ", ".join(f"{name}={spec.model.backbone}" for name, spec in study.teachers.items())
        card = (
            f"MGD student {study.student.backbone} distilled from {teachers}\n"
            f"dataset {study.data.dataset}, partition {study.data.partition} ({study.data.protocol}); val mIoU {100 * best['miou']:.2f}\n"
            f"params {params_m:.2f} M, {gflops:.2f} GFLOPs at {study.data.crop_size}^2; study {study.name}, "
            f"trial run {best['run_id']}, config {json.dumps(best['params'], sort_keys=True)}\n"
            "serves images: column 'image' (JPEG/PNG bytes) in, column 'mask' (class-id PNG) out"
        )
        return log_served_model(
            plan.tracking_uri, plan.parent_run_id, ckpt, study.data.crop_size, f"{study.name}-student", card
        )


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
