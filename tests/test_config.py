"""Job configuration: defaults, validation messages with YAML paths, path resolution."""

from pathlib import Path

import pytest

from mgd_ray.config import (
    ConfigError,
    absolute_paths,
    load_job_config,
    parse_job_config,
)


def test_defaults_follow_the_official_code():
    cfg = parse_job_config(
        "student",
        {"teachers": {"T_D": {"model": {}, "checkpoint": "a.pt"}, "T_W": {"model": {}, "checkpoint": "b.pt"}}},
    )
    assert (cfg.losses.lambda_1, cfg.losses.lambda_2, cfg.losses.pool_size) == (0.002, 100.0, 7)
    assert cfg.losses.image_reduction == "sum" and cfg.teacher_mode == "eval"
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power) == (0.9, 1e-4, 0.9)


def test_teacher_count_and_kd_teacher_are_checked():
    with pytest.raises(ConfigError, match="give one or two teachers, got 3"):
        parse_job_config("student", {"teachers": {k: {"model": {}, "checkpoint": "x"} for k in "abc"}})
    with pytest.raises(ConfigError, match="method 'kd' distills from a teacher"):
        parse_job_config("baseline", {"method": "kd"})


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_job_config(tmp_path / "missing.yaml", "teacher")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=f"{f}: the top level must be a mapping"):
        load_job_config(f, "teacher")
    with pytest.raises(ConfigError, match="unknown job kind 'pupil'"):
        parse_job_config("pupil", {})


def test_partition_spelling_is_normalised():
    assert parse_job_config("baseline", {"data": {"partition": "1-8"}}).data.partition == "1/8"


def test_relative_paths_become_absolute():
    cfg = parse_job_config(
        "student", {"teachers": {"T_D": {"model": {}, "checkpoint": "t/model.pt"}}, "losses": {"region_teachers": []}}
    )
    fixed = absolute_paths(cfg, Path("/base"))
    assert fixed.teachers["T_D"].checkpoint == Path("/base/t/model.pt")
    assert fixed.data.root == Path("/base/data/builtin")
    assert fixed.output == Path("/base/mgd_ray_runs/student")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "studies" / "jobs").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_job_files_validate(path):
    from mgd_ray.config import load_job_config

    kind = path.stem.split("_")[0]
    assert load_job_config(path, kind).kind == kind


def test_a_corpus_keeps_images_to_train_on():
    from mgd_ray.config import CorpusConfig

    with pytest.raises(ValueError, match="num_val: 300 held out leaves none of the 300 images"):
        CorpusConfig(num_images=300, num_val=300)
