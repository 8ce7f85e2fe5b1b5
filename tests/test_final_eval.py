"""The val results a finished job records next to its exported network, for the run's artifacts."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mgd_ray.checkpoint import segmenter_record
from mgd_ray.config import parse_job_config
from mgd_ray.final_eval import load_examples, load_model, recorded_evaluation, save_examples
from mgd_ray.jobs.baselines import run_baseline
from mgd_ray.jobs.cps import run_teacher
from mgd_ray.models.deeplab import build_segmenter


def _run(kind, runner, tiny_data_cfg, tiny_schedule, tmp_path, extra) -> tuple[dict, Path]:
    cfg = parse_job_config(kind, {"data": tiny_data_cfg, "schedule": {**tiny_schedule, "iterations": 2}, **extra})
    saved = tmp_path / "model.pt"
    last: dict = {}

    def report(metrics, ckpt_dir):
        last.update(metrics)
        shutil.copyfile(ckpt_dir / "model.pt", saved)

    runner(cfg, report, tmp_path / "ckpt")
    return last, saved


def _independent_confusion(path: Path, data) -> np.ndarray:
    """Rows = truth, columns = prediction, counted with numpy over every labeled val pixel."""
    model = load_model(path, data.num_classes, "model")
    k = data.num_classes
    counts = np.zeros((k, k), dtype=np.int64)
    with torch.no_grad():
        for item in data.val:
            pred = model(item["image"][None]).logits.argmax(1)[0].numpy().ravel()
            truth = item["label"].numpy().ravel()
            keep = truth < k
            counts += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    return counts


@pytest.mark.parametrize(
    "kind,runner,extra",
    [
        ("baseline", run_baseline, {"method": "supervised"}),
        ("teacher", run_teacher, {"model": {"backbone": "mobilenet_v2"}}),  # two branches: the exported one's matrix
    ],
)
def test_recorded_confusion_is_the_exported_networks_own(
    kind, runner, extra, tiny_data_cfg, tiny_job_data, tiny_schedule, tmp_path
):
    metrics, path = _run(kind, runner, tiny_data_cfg, tiny_schedule, tmp_path, extra)
    final = recorded_evaluation(path)
    expected = _independent_confusion(path, tiny_job_data)
    np.testing.assert_array_equal(final.confusion, expected)
    assert final.confusion.sum() == sum(
        int((item["label"] < tiny_job_data.num_classes).sum()) for item in tiny_job_data.val
    )
    assert final.miou == pytest.approx(metrics["val/mIoU"])
    assert final.class_names == tiny_job_data.class_names


def test_a_record_without_a_confusion_matrix_is_refused_by_name(tiny_job_data, tmp_path):
    path = tmp_path / "old.pt"
    cfg = parse_job_config("baseline", {}).student
    torch.save(
        segmenter_record(build_segmenter("resnet18", tiny_job_data.num_classes), cfg, tiny_job_data, 32, "student"),
        path,
    )
    with pytest.raises(ValueError, match=r"old\.pt: no recorded val confusion matrix"):
        recorded_evaluation(path)


def test_saved_examples_load_back_as_the_teachers_own_predictions(tiny_job_data, tmp_path):
    cfg = parse_job_config("baseline", {}).student
    paths = {}
    for name, seed in (("T_D", 0), ("T_W", 1)):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(
            segmenter_record(build_segmenter("resnet18", tiny_job_data.num_classes), cfg, tiny_job_data, 32, "teacher"),
            paths[name],
        )
    saved = save_examples(tmp_path / "examples.npz", paths, tiny_job_data, count=3)
    images, truths, preds = load_examples(saved)
    assert len(images) == len(truths) == 3 and list(preds) == ["T_D", "T_W"]
    for name, path in paths.items():
        model = load_model(path, tiny_job_data.num_classes, name)
        for i in range(3):
            item = tiny_job_data.val[i]
            np.testing.assert_array_equal(truths[i], item["label"].numpy())
            with torch.no_grad():
                np.testing.assert_array_equal(preds[name][i], model(item["image"][None]).logits.argmax(1)[0].numpy())
