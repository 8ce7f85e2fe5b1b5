"""Study files: validation messages name the YAML path; smoke shrinking; the repository's studies validate."""

from pathlib import Path

import pytest
import yaml

from mgd_ray.cli import main
from mgd_ray.config import ConfigError
from mgd_ray.study.config import load_study, parse_study
from mgd_ray.study.search import make_scheduler, optuna_distributions
from mgd_ray.study.smoke import smoke

STUDIES = sorted((Path(__file__).parents[2] / "studies").glob("*.yaml"))
MINIMAL = {
    "name": "s",
    "teachers": {"T_D": {"model": {"backbone": "resnet50"}}, "T_W": {"model": {"backbone": "wide_resnet50_2"}}},
}


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_study(raw, "study.yaml")
    return [line.strip() for line in str(err.value).splitlines()[1:]]


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_in_the_repository_validates(path):
    study = load_study(path)
    assert study.name
    assert smoke(study).schedule.iterations == 4


def test_minimal_study_defaults():
    study = parse_study(MINIMAL)
    assert study.experiment == "s"
    assert study.default_combo == "T_D+T_W"
    assert study.mlflow.tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    "patch, expected",
    [
        (
            {"search": {"lambda_1": {"low": 0, "high": 1, "log": True}}},
            "search.lambda_1.low: must be > 0 for a log range",
        ),
        ({"search": {"lambda_1": {"low": 2, "high": 1}}}, "search.lambda_1.high: must be >= low (2.0), got 1.0"),
        ({"search": {"lambda_2": {"low": -1, "high": 1}}}, "search.lambda_2.low: must be >= 0 (a loss weight)"),
        ({"search": {"lr": {"low": 0, "high": 1}}}, "search.lr.low: must be > 0"),
        ({"search": {"pool_size": {"choices": [0, 4]}}}, "search.pool_size.choices: must all be >= 1"),
        ({"search": {"pool_size": {"choices": []}}}, "search.pool_size.choices: List should have at least 1 item"),
        (
            {"search": {"teachers": {"choices": ["T_D+T_X"]}}},
            "search.teachers: 'T_D+T_X' names teacher 'T_X', not defined under teachers",
        ),
        ({"baselines": [{"method": "kd"}]}, "baselines.0.teacher: kd needs a teacher (one of T_D, T_W)"),
        (
            {"baselines": [{"method": "supervised", "distill_on": "labeled+unlabeled"}]},
            "baselines.0.distill_on: only kd and cwd distil from a teacher, so remove it",
        ),
        (
            {"baselines": [{"method": "kd", "teacher": "T_D"}, {"method": "kd", "teacher": "T_D"}]},
            "baselines: kd[T_D] is listed twice (give each baseline once)",
        ),
        ({"searcher": {"num_samples": 0}}, "searcher.num_samples: Input should be greater than 0"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"name": "a b"}, "name: String should match pattern"),
        (
            {"schedule": {"iterations": 10, "eval_every": 10}},
            "scheduler.type: ASHA needs at least two evaluations per trial",
        ),
        (
            {"ray_train": {"in_trial": True}, "resources": {"workers": 2}},
            "ray_train.in_trial: runs a job in the trial's own process, which needs resources.workers: 1 (it is 2)",
        ),
    ],
)
def test_broken_studies_give_their_yaml_path(patch, expected):
    raw = {**MINIMAL, **patch}
    errors = errors_of(raw)
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_reported_at_once():
    raw = {**MINIMAL, "searcher": {"num_samples": 0, "max_concurrent": 0}, "seeds": []}
    errors = errors_of(raw)
    assert len(errors) == 3, errors


def test_teacher_source_is_exclusive():
    raw = {**MINIMAL, "teachers": {"T_D": {"model": {"backbone": "resnet50"}, "checkpoint": "a.pt", "mlflow_run": "x"}}}
    assert any("give one of recipe, checkpoint, mlflow_run" in e for e in errors_of(raw))


def test_search_space_to_optuna_and_asha():
    study = parse_study(
        {
            **MINIMAL,
            "schedule": {"iterations": 100, "eval_every": 20},
            "search": {"lambda_1": {"low": 1e-4, "high": 1e-2, "log": True}, "pool_size": {"choices": [2, 4]}},
            "scheduler": {"grace_period": 1, "reduction_factor": 3},
        }
    )
    dists = optuna_distributions(study.search)
    assert dists["lambda_1"].log and dists["lambda_1"].low == 1e-4
    assert dists["pool_size"].choices == (2, 4)
    asha = make_scheduler(study)
    assert asha._max_t == 6  # 100 iterations / evaluation every 20, plus one (see make_scheduler)


def test_validate_cli(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "search": {"lambda_1": {"low": -1, "high": 1}}}))
    assert main(["validate", str(good)]) == 0
    assert "valid study 's'" in capsys.readouterr().out
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: invalid study" in err and "search.lambda_1" in err


def test_ray_train_options_reach_ray_under_the_names_it_reads():
    """The variables must be ones the installed Ray Train reads and propagates to its controller and workers."""
    from ray.train.v2._internal.constants import (
        ENABLE_PREEMPTION_WATCHER_ENV_VAR,
        ENV_VARS_TO_PROPAGATE,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    )

    study = parse_study({**MINIMAL, "ray_train": {"health_check_interval_s": 0.25, "preemption_watcher": False}})
    env = study.ray_train.env_vars()
    assert env == {HEALTH_CHECK_INTERVAL_S_ENV_VAR: "0.25", ENABLE_PREEMPTION_WATCHER_ENV_VAR: "0"}
    assert set(env) <= ENV_VARS_TO_PROPAGATE
    assert parse_study(MINIMAL).ray_train.env_vars()[HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "2.0"  # Ray's own default
    assert any(
        e.startswith("ray_train.health_check_interval_s: Input should be greater than 0")
        for e in errors_of({**MINIMAL, "ray_train": {"health_check_interval_s": 0}})
    )


# ---------------------------------------------------------------------------- searching the student
def test_a_searched_student_and_a_cost_objective_validate_together():
    ok = parse_study(
        MINIMAL
        | {
            "search": {
                "student_backbone": {"choices": ["resnet18", "mobilenet_v2"]},
                "student_output_stride": {"choices": [8, 16]},
            },
            "searcher": {"cost": "latency", "sampler": "nsga2", "max_gflops": 5},
        }
    )
    from mgd_ray.study.costs import architectures

    assert list(architectures(ok)) == ["resnet18-os8", "resnet18-os16", "mobilenet_v2-os8", "mobilenet_v2-os16"]
    assert ok.searcher.multi_objective and ok.searcher.measures_latency


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"searcher": {"cost": "gflops"}}, "searcher.cost: gflops is a second objective only when the search varies"),
        (
            {
                "search": {"student_backbone": {"choices": ["resnet18"]}},
                "searcher": {"cost": "params", "sampler": "cmaes"},
            },
            "searcher.sampler: cmaes optimises one objective",
        ),
        (
            {"search": {"student_backbone": {"choices": ["vgg16"]}}},
            "search.student_backbone.choices.0: Input should be",
        ),
        (
            {"search": {"student_output_stride": {"choices": [4]}}},
            "search.student_output_stride.choices.0: Input should be",
        ),
        (
            {
                "student": {"backbone": "mobilenet_v2", "output_stride": 32, "layout": "official"},
                "search": {"student_output_stride": {"choices": [16, 32]}},
            },
            "search.student_backbone: the student has layout: official",
        ),
    ],
)
def test_a_student_search_that_cannot_run_is_refused_naming_the_field(patch, expected):
    assert any(line.startswith(expected) for line in errors_of(MINIMAL | patch)), errors_of(MINIMAL | patch)
