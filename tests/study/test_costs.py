"""The students a study may train, their costs counted and measured, and the searcher's limits."""

import json

import pytest
import ray

from mgd_ray.config import ConfigError, ModelConfig
from mgd_ray.models.complexity import segmenter_cost
from mgd_ray.study.config import parse_study
from mgd_ray.study.costs import (
    LATENCY_CACHE,
    Cost,
    allowed,
    architectures,
    counted_costs,
    measure_latencies,
    student_model,
    with_latency,
)

BASE = {
    "name": "s",
    "teachers": {"T_D": {"model": {"backbone": "resnet18"}}, "T_W": {"model": {"backbone": "resnet34"}}},
    "student": {"backbone": "resnet18", "stem": "deep", "pretrained": "builtin"},
    "data": {"crop_size": 32},
}


def test_each_searched_student_keeps_the_rest_of_the_student_and_mobilenet_its_own_stem():
    study = parse_study(
        BASE
        | {
            "search": {
                "student_backbone": {"choices": ["resnet18", "mobilenet_v2"]},
                "student_output_stride": {"choices": [16, 32]},
            }
        }
    )
    found = architectures(study)
    assert list(found) == ["resnet18-os16-deep", "resnet18-os32-deep", "mobilenet_v2-os16", "mobilenet_v2-os32"]
    assert found["mobilenet_v2-os32"] == ModelConfig(backbone="mobilenet_v2", output_stride=32, pretrained="builtin")
    assert student_model(study, {"student": "resnet18-os32-deep"}).stem == "deep"
    assert student_model(study, {"lambda_1": 0.1}) == study.student  # not searched: the study's student
    with pytest.raises(ValueError, match="'vgg-os8' is not one of resnet18-os16-deep"):
        student_model(study, {"student": "vgg-os8"})
    # Counted on the meta device, as the complexity table counts them.
    costs = counted_costs(found, 21, 32)
    assert costs["mobilenet_v2-os32"] == Cost(*segmenter_cost(found["mobilenet_v2-os32"], 21, 32))


def test_limits_drop_what_is_over_them_and_name_the_field_when_nothing_is_left():
    study = parse_study(BASE | {"searcher": {"max_params_m": 10, "max_latency_ms": 5}})
    costs = {"a": Cost(5.0, 1.0, 4.0), "b": Cost(12.0, 2.0, 4.0), "c": Cost(5.0, 1.0, 6.0), "d": Cost(5.0, 1.0, None)}
    kept, out = allowed(study, costs)
    # d's latency is not measured yet (the limit is checked again once it is)
    assert kept == ["a", "d"]
    assert out == {"b": "12 M params > searcher.max_params_m 10", "c": "6 ms > searcher.max_latency_ms 5"}
    with pytest.raises(ConfigError, match=r"no student architecture .* b \(12 M params > searcher.max_params_m 10\)"):
        allowed(study, {"b": costs["b"]})


def test_latency_is_measured_once_per_architecture_and_machine_then_read_from_the_cache(tmp_path):
    models = {"small": ModelConfig(backbone="mobilenet_v2", output_stride=32)}
    # The same model under two names (a searched architecture that is also the baselines' student)
    # is measured once, so both names get the same figure.
    twice = models | {"student": ModelConfig(backbone="mobilenet_v2", output_stride=32, pretrained="builtin")}
    where, first, new = measure_latencies(twice, 4, 32, "cpu", 1, {})
    assert where.startswith("cpu ") and first["small"] > 0 and list(new.values()) == [first["small"]]
    assert first["student"] == first["small"]
    _, again, none = measure_latencies(twice, 4, 32, "cpu", 1, new)
    assert again == first and none == {}  # read back, not measured (a second timing would differ)
    _, other, more = measure_latencies(models, 4, 32, "cpu", 2, new)
    assert len(more) == 1  # another thread count is another measurement

    # In a study: one Ray task on the named device, and the cache file under the study storage.
    study = parse_study(BASE | {"searcher": {"latency_threads": 1}})
    costs = {"small": Cost(1.0, 0.1)}
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        measured, machine = with_latency(study, models, costs, 4, tmp_path)
        cached = json.loads((tmp_path / LATENCY_CACHE).read_text())
        again, _ = with_latency(study, models, costs, 4, tmp_path)
    finally:
        ray.shutdown()
    assert (
        machine == where
        and measured["small"].latency_ms > 0
        and list(cached.values()) == [measured["small"].latency_ms]
    )
    assert again == measured
