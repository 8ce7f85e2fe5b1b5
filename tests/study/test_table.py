"""A table study: ``data.partitions`` expands into one study per partition, each with a teacher of
its own partition (trained once, then reused), and one table of them whose cells are the cells' own
figures, read back from MLflow; the paper's figures sit beside them; ``--resume`` reruns no cell."""

from __future__ import annotations

import json

import pytest
import ray
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.config import ConfigError
from mgd_ray.study.config import parse_study
from mgd_ray.study.run import run_table
from mgd_ray.study.table import cell_name, table_cells
from mgd_ray.testing import tiny_builtin_study

TINY = {"iterations": 2, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def table_raw(root) -> dict:
    raw = tiny_builtin_study("tbl", root, f"sqlite:///{root / 'mlflow.db'}", TINY, trials=1)
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "partition"} | {"partitions": ["1/4", "1/2"]}
    raw["student"] = {"backbone": "resnet18"}
    return raw | {
        "baselines": [{"method": "supervised"}],
        "scheduler": {"type": "none"},
        "ray_train": {"in_trial": True},
        "report": {"onnx": False, "paper": "voc"},
    }


def test_a_table_study_expands_into_one_study_per_partition(tmp_path):
    study = parse_study(table_raw(tmp_path))
    cells = table_cells(study)
    assert [c.name for c in cells] == ["tbl-1_4", "tbl-1_2"] == [cell_name("tbl", p) for p in ("1/4", "1/2")]
    assert [c.data.partition for c in cells] == ["1/4", "1/2"] and all(not c.data.partitions for c in cells)
    assert {c.experiment for c in cells} == {"tbl"}  # one MLflow experiment for the whole table
    with pytest.raises(ConfigError, match="data.partitions: lists 1/4 more than once"):
        parse_study(table_raw(tmp_path) | {"data": study.data.model_dump(mode="json") | {"partitions": ["1/4", "1-4"]}})
    single = table_raw(tmp_path)
    del single["data"]["partitions"]
    with pytest.raises(ConfigError, match="report.paper: sets the paper's figures beside a table study's cells"):
        parse_study(single)


@pytest.mark.slow  # two tiny studies on a local Ray
def test_a_two_partition_study_fills_both_columns_with_the_cells_figures(tmp_path):
    study = parse_study(table_raw(tmp_path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        table = run_table(study, base=tmp_path)
        again = run_table(study, base=tmp_path, resume=True)  # every cell finished: none runs again
    finally:
        ray.shutdown()
    exp = client.get_experiment_by_name("tbl").experiment_id

    def runs(kind: str) -> list:
        return client.search_runs([exp], filter_string=f"tags.`{tracking.KIND_TAG}` = '{kind}'")

    parents = {r.data.tags[tracking.STUDY_TAG]: r for r in runs("study")}
    assert sorted(parents) == ["tbl-1_2", "tbl-1_4"]  # the resume ran no cell again
    # One teacher per partition: trained for its own labels, used by every job of its cell.
    teachers = {t.data.params["data.partition"]: t for t in runs("teacher")}
    assert len(runs("teacher")) == 2 and sorted(teachers) == ["1/2", "1/4"]
    text = table.read_text()
    assert again.read_text() == text
    assert "| method | backbone | 1/4 | paper | 1/2 | paper |" in text
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)  # the val table comes first
    expected = {
        "T_D (resnet18)": ["resnet18"],
        "supervised": ["resnet18"],
        "MGD (best searched configuration)": ["resnet18"],
    }
    # The paper's Table 1 (VOC, ResNet-18 student): Sup-only 62.52 and 65.39, MGD 69.71 and 71.59 at
    # 1/4 and 1/2; it has no ResNet-18 teacher.
    paper = {
        "T_D (resnet18)": ("–", "–"),
        "supervised": ("62.52", "65.39"),
        "MGD (best searched configuration)": ("69.71", "71.59"),
    }
    for i, partition in enumerate(("1/4", "1/2")):
        parent = parents[cell_name("tbl", partition)]
        children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        jobs = [r for r in children if r.data.tags[tracking.KIND_TAG] in ("trial", "baseline")]
        last = {
            r.data.tags[tracking.KIND_TAG]: tracking.metric_history(client, r.info.run_id, "val/mIoU")[-1][1]
            for r in jobs
        }
        assert len(jobs) == 2 and sorted(last) == ["baseline", "trial"]  # one seed, one trial: nothing to average
        teacher = tracking.metric_history(client, teachers[partition].info.run_id, "val/mIoU")[-1][1]
        assert parent.data.metrics["teacher/T_D/val_mIoU"] == teacher
        for label, value in (
            ("T_D (resnet18)", teacher),
            ("supervised", last["baseline"]),
            ("MGD (best searched configuration)", last["trial"]),
        ):
            expected[label] += [f"{100 * value:.2f} ± 0.00", paper[label][i]]
        assert f"`{cell_name('tbl', partition)}`, parent run `{parent.info.run_id}`" in text
    assert rows == {label: [label, *cells] for label, cells in expected.items()}
    assert (tmp_path / "runs" / "tbl" / "table" / "table.png").stat().st_size > 10_000
    tables = runs("table")
    assert len(tables) == 1 and json.loads(tables[0].data.tags["mgd_ray.cells"]) == {
        p: parents[cell_name("tbl", p)].info.run_id for p in ("1/4", "1/2")
    }


def test_a_table_of_a_student_search_names_the_student_each_cell_chose(tmp_path):
    from mgd_ray.study.records import load_record
    from mgd_ray.study.table import table_markdown, table_rows
    from mgd_ray.testing import record_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = table_raw(tmp_path)
    raw["search"] = {"student_backbone": {"choices": ["mobilenet_v2", "resnet18"]}}
    study = parse_study(raw)
    client = MlflowClient(uri)
    records, run_ids = {}, {}
    for cell, winner in zip(table_cells(study), ("resnet18-os16", "mobilenet_v2-os16"), strict=True):
        loser = "mobilenet_v2-os16" if winner == "resnet18-os16" else "resnet18-os16"
        trials = [({"student": winner}, [0.3, 0.5], "finished"), ({"student": loser}, [0.2, 0.4], "finished")]
        cell_raw = json.loads(cell.model_dump_json())
        run_ids[cell.data.partition] = record_study(uri, cell_raw, trials, baselines={"supervised": [0.35]})
        records[cell.data.partition] = load_record(client, uri, run_ids[cell.data.partition])
    text = table_markdown(study, table_rows(study, records), run_ids)
    assert "| MGD (best searched configuration) | searched (per cell) | 50.00 ± 0.00 (resnet18-os16) |" in text
    assert "| 50.00 ± 0.00 (mobilenet_v2-os16) |" in text
