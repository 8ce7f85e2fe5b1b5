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


def _independent_confusion(path: Path, data, split=None) -> np.ndarray:
    """Rows = truth, columns = prediction, counted with numpy over every labeled pixel of ``split`` (val)."""
    model = load_model(path, data.num_classes, "model")
    k = data.num_classes
    counts = np.zeros((k, k), dtype=np.int64)
    with torch.no_grad():
        for item in data.val if split is None else split:
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


def test_the_test_figures_are_the_models_own_on_the_test_images(tmp_path, tiny_data_cfg, tiny_schedule, teacher_ckpt):
    from mgd_ray.config import DataConfig
    from mgd_ray.data.stream import load_job_data
    from mgd_ray.final_eval import evaluate_on_test
    from mgd_ray.metrics import iou_per_class

    with_test = tiny_data_cfg | {"root": str(tmp_path / "data"), "builtin": tiny_data_cfg["builtin"] | {"num_test": 3}}
    _, path = _run("baseline", run_baseline, with_test, tiny_schedule, tmp_path, {"method": "supervised"})
    data_cfg = DataConfig.model_validate(with_test)
    data = load_job_data(data_cfg)
    assert data.test is not None and data.test.ids == ["test_00000", "test_00001", "test_00002"]
    assert not set(data.test.ids) & set(data.labeled.ids + data.unlabeled.ids + data.val.ids)
    figures = evaluate_on_test({"student": path, "teacher": teacher_ckpt}, data_cfg, batch=2)
    for name, model_path in (("student", path), ("teacher", teacher_ckpt)):
        counts = _independent_confusion(model_path, data, split=data.test)
        expected = iou_per_class(torch.from_numpy(counts))
        assert figures[name]["test/mIoU"] == pytest.approx(float(np.nanmean(expected.numpy())))
        assert set(figures[name]) == {"test/mIoU"} | {f"test/IoU/{c}" for c in data.class_names}
    with pytest.raises(ValueError, match="no test split"):
        evaluate_on_test({"student": path}, DataConfig.model_validate(tiny_data_cfg), batch=2)
