"""Report helpers that need only an MLflow store (no Ray)."""

from pathlib import Path
from types import SimpleNamespace

from mlflow.entities import Metric

from mgd_ray import tracking
from mgd_ray.study.report import _baseline_legend, _verdict
from mgd_ray.study.results import finalize_stopped


def test_stopped_runs_keep_their_real_end_time(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "s")
    parent, _ = tracking.get_or_create_run(client, exp, "study/s", "study s", {tracking.KIND_TAG: "study"})

    def child(key: str, state: str) -> str:
        run_id, _ = tracking.get_or_create_run(client, exp, key, key, {tracking.KIND_TAG: "trial"}, parent)
        tracking.set_tags(client, run_id, {tracking.STATE_TAG: state})
        return run_id

    # Killed mid-trial before it could close its run: its last metric is at t = 7000 ms.
    killed = child("killed", "running")
    client.log_batch(
        killed,
        metrics=[
            Metric("val/mIoU", 0.2, 5000, 1),
            Metric("val/mIoU", 0.3, 7000, 2),
            Metric("loss/total", 1.0, 6500, 2),
        ],
    )
    # Interrupted: it terminated itself at t = 9000 ms.
    stopped = child("stopped", "interrupted")
    client.set_terminated(stopped, "KILLED", end_time=9000)
    done = child("done", "finished")
    client.set_terminated(done, "FINISHED", end_time=12000)

    finalize_stopped(SimpleNamespace(tracking_uri=uri, experiment_id=exp, parent_run_id=parent))
    k, s, d = (client.get_run(r) for r in (killed, stopped, done))
    assert k.data.tags[tracking.STATE_TAG] == "stopped_early" and k.info.status == "KILLED" and k.info.end_time == 7000
    assert s.data.tags[tracking.STATE_TAG] == "stopped_early" and s.info.end_time == 9000
    assert d.data.tags[tracking.STATE_TAG] == "finished" and d.info.end_time == 12000


def test_verdict_gaps_against_the_seed_spread_and_the_search_selection():
    teacher = [{"name": "teacher T_D", "miou": 0.5, "gflops": 1.25}]
    one = _verdict([0.40], {"supervised": [0.37]}, teacher, searched=8)
    assert "MGD is 3.00 mIoU above supervised (one seed each: the spread between seeds is unknown" in one
    assert "best of 8 searched trials" in one  # a maximum over trials against single baseline runs
    assert "The teacher T_D reaches 50.00 mIoU at 1.25 GFLOPs." in one
    # Over seeds: MGD 0.38 ± 0.02 (sample std), supervised 0.36 ± 0.01; the gap 2.00 is within 2 × 2.00.
    seeds = _verdict([0.40, 0.36, 0.38], {"supervised": [0.35, 0.37, 0.36], "kd": [0.30, 0.31, 0.29]}, [], searched=8)
    assert "MGD is 2.00 mIoU above supervised (within twice the seed-to-seed spread of 2.00)." in seeds
    assert "MGD is 8.00 mIoU above kd (larger than twice the seed-to-seed spread of 2.00)." in seeds
    assert "searched trials" not in seeds  # repeated over seeds: no longer a single selected maximum


def test_the_report_says_what_a_distillation_baseline_distilled_on():
    assert _baseline_legend({"supervised": [0.4]}) == []
    legend = " ".join(_baseline_legend({"supervised": [0.4], "kd[T_D]": [0.4], "kd[T_D]+unlabeled": [0.45]}))
    assert "on the labeled images only, as the paper's baselines do" in legend
    assert "`+unlabeled` rows also distil on MGD's CutMix-ed unlabeled images" in legend


def test_the_figure_of_a_run_is_its_last_evaluation():
    from mgd_ray.study.results import final_miou

    # The exported (and registered) weights are the last step's: their mIoU, not the run's peak.
    assert final_miou([(40, 0.31), (80, 0.42), (120, 0.38)]) == 0.38
    assert final_miou([(40, 0.31), (80, float("nan"))]) == 0.31  # an undefined last value is skipped
    assert final_miou([]) is None


def test_the_report_says_what_each_split_is():
    from mgd_ray.config import DataConfig
    from mgd_ray.study.report import _splits_line

    def line(cfg: DataConfig, val: int, test: int | None) -> str:
        data = SimpleNamespace(
            labeled=[0] * 3, unlabeled=[0] * 7, val=[0] * val, test=None if test is None else [0] * test
        )
        return _splits_line(SimpleNamespace(study=SimpleNamespace(data=cfg)), data)

    assert line(DataConfig(dataset="voc", partition="1/8"), 1449, None) == (
        "Data: voc, 3 labeled and 7 unlabeled training images; val (the search and ASHA): the official val set "
        "(1449 images); test (the final evaluation only): none: the paper's protocol reports on val."
    )
    selected = line(DataConfig(dataset="voc", partition="1/8", selection=100, split_seed=4), 100, 1449)
    assert (
        "val (the search and ASHA): 100 unlabeled training images held out as a selection set (`split_seed` 4)"
        in selected
    )
    assert "test (the final evaluation only): the official val set (1449 images)." in selected
    folder = line(DataConfig(dataset="folder", val=Path("v.txt"), test=0.1), 5, 2)
    assert "val (the search and ASHA): 5 images listed in `v.txt`" in folder
    assert "test (the final evaluation only): 2 images carved from the labeled images (`split_seed` 0)." in folder
    assert line(DataConfig(), 64, None).endswith(
        "val (the search and ASHA): 64 generated images; test (the final evaluation only): none."
    )
