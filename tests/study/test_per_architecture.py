"""Early stopping in a multi-objective search: ASHA on val mIoU within each student architecture."""

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from mgd_ray.study.per_architecture import PerArchitectureASHA

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def trial(trial_id: str, student: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"student": student, "lambda_1": 0.01})


def result(step: int, miou: float) -> dict:
    return {"training_iteration": step, "val/mIoU": miou}


def test_a_trial_is_stopped_only_by_trials_of_its_own_architecture():
    asha = PerArchitectureASHA("student", time_attr="training_iteration", max_t=5, grace_period=1, reduction_factor=2)
    assert asha.set_search_properties("val/mIoU", "max")  # Tune's TuneConfig metric and mode
    big_a, big_b = trial("a", "resnet18-os16"), trial("b", "resnet18-os16")
    small = trial("c", "mobilenet_v2-os16")
    for t in (big_a, big_b, small):
        asha.on_trial_add(None, t)

    # The expensive architecture's first trial sets its rung; the cheap one, far below it, is alone
    # in its own rung and goes on (one ASHA over all trials would stop it: 0.10 < 0.50).
    assert asha.on_trial_result(None, big_a, result(1, 0.50)) == CONTINUE
    assert asha.on_trial_result(None, small, result(1, 0.10)) == CONTINUE
    # A second resnet18 trial below the first is stopped at the same rung: ASHA within the architecture.
    assert asha.on_trial_result(None, big_b, result(1, 0.40)) == STOP
    # A second cheap trial is compared with the cheap one only.
    small_2 = trial("d", "mobilenet_v2-os16")
    asha.on_trial_add(None, small_2)
    assert asha.on_trial_result(None, small_2, result(1, 0.12)) == CONTINUE
    small_3 = trial("e", "mobilenet_v2-os16")
    asha.on_trial_add(None, small_3)
    assert asha.on_trial_result(None, small_3, result(1, 0.05)) == STOP
    assert asha.stopped() == {"resnet18-os16": 1, "mobilenet_v2-os16": 1}
    # A finished trial leaves its architecture's bookkeeping.
    asha.on_trial_complete(None, big_a, result(4, 0.6))
    assert "a" not in asha._group_of and "a" not in asha._groups["resnet18-os16"]._trial_info


def test_another_metric_than_the_schedulers_is_refused():
    asha = PerArchitectureASHA("student", metric="val/mIoU", mode="max", max_t=5)
    assert asha.set_search_properties("val/mIoU", "max")
    assert not asha.set_search_properties("loss/total", "min")
