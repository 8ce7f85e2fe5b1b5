"""``mgd-ray compare``: two studies of one tracking store read back side by side, every figure the
mean ± std of their runs' own last evaluations, the student's cost as each report logged it."""

import statistics

from mgd_ray.cli import main
from mgd_ray.study.compare import write_compare
from mgd_ray.testing import record_study, tiny_builtin_study

SCHEDULE = {"iterations": 2, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def _two_studies(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = tiny_builtin_study("small", tmp_path, uri, SCHEDULE, trials=2)
    large = tiny_builtin_study("large", tmp_path, uri, SCHEDULE, trials=2)
    large["student"] = {"backbone": "resnet18"}
    large["data"] = large["data"] | {"partition": "1/2"}
    record_study(
        uri,
        small,
        [
            ({"lambda_1": 0.002, "lambda_2": 3.0}, [0.2, 0.40], "finished"),
            ({"lambda_1": 0.01, "lambda_2": 9.0}, [0.1], "stopped_early"),
        ],
        baselines={"supervised": [0.30, 0.34]},
        repeats=[0.44],
        cost={"student/gflops": 0.05, "student/params_m": 2.5},
    )
    record_study(
        uri,
        large,
        [({"lambda_1": 0.004, "lambda_2": 5.0}, [0.3, 0.52], "finished")],
        baselines={"supervised": [0.45]},
        cost={"student/gflops": 0.40, "student/params_m": 12.0},
    )
    return uri


def _cell(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f} (n={len(values)})"


def test_compare_reads_back_each_studys_best_configuration_figures_and_cost(tmp_path):
    uri = _two_studies(tmp_path)
    text, files = write_compare(uri, ["small", "large"], tmp_path / "out")
    assert [f.name for f in files] == ["compare.md", "compare.png"] and files[1].stat().st_size > 10_000
    assert files[0].read_text() == text
    assert _cell([0.40, 0.44]) == "42.00 ± 2.83 (n=2)"  # the independent formula, once by hand
    expected = [
        f"| small | builtin 1/4 | mobilenet_v2 (OS 16) | 2.50 | 0.05 (32²) | MGD (best configuration) | {_cell([0.40, 0.44])} |",
        f"| small | builtin 1/4 | mobilenet_v2 (OS 16) | 2.50 | 0.05 (32²) | supervised | {_cell([0.30, 0.34])} |",
        f"| large | builtin 1/2 | resnet18 (OS 16) | 12.00 | 0.40 (32²) | MGD (best configuration) | {_cell([0.52])} |",
        f"| large | builtin 1/2 | resnet18 (OS 16) | 12.00 | 0.40 (32²) | supervised | {_cell([0.45])} |",
    ]
    rows = [line for line in text.splitlines() if line.startswith("| small") or line.startswith("| large")]
    assert rows == expected
    assert "- `small` (parent run `" in text and '`{"lambda_1": 0.002, "lambda_2": 3.0}`' in text
    assert '`{"lambda_1": 0.004, "lambda_2": 5.0}`' in text


def test_the_compare_command_prints_the_table_or_one_line_for_an_unknown_study(tmp_path, capsys):
    uri = _two_studies(tmp_path)
    assert main(["compare", "small", "large", "--tracking-uri", uri, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "| large | builtin 1/2 | resnet18 (OS 16) |" in out and (tmp_path / "c" / "compare.png").is_file()
    assert main(["compare", "small", "typo", "--tracking-uri", uri, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("no finished study 'typo'") and "large, small" in err
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_a_study_that_searched_its_student_compares_mgd_at_the_chosen_students_cost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_builtin_study("front", tmp_path, uri, SCHEDULE, trials=2)
    raw["search"] = {"student_backbone": {"choices": ["mobilenet_v2", "resnet18"]}}
    record_study(
        uri,
        raw,
        [({"student": "resnet18-os16"}, [0.5], "finished"), ({"student": "mobilenet_v2-os16"}, [0.4], "finished")],
        baselines={"supervised": [0.3]},
        cost={"student/gflops": 0.05, "student/params_m": 2.5},  # the baselines' student: mobilenet_v2
        student_costs={"resnet18-os16": {"gflops": 0.4, "params_m": 12.0}, "mobilenet_v2-os16": {"gflops": 0.05}},
    )
    text, _ = write_compare(uri, ["front"], tmp_path / "out")
    rows = [line for line in text.splitlines() if line.startswith("| front")]
    assert rows == [
        f"| front | builtin 1/4 | resnet18-os16 | 12.00 | 0.40 (32²) | MGD (best configuration) | {_cell([0.5])} |",
        f"| front | builtin 1/4 | mobilenet_v2 (OS 16) | 2.50 | 0.05 (32²) | supervised | {_cell([0.3])} |",
    ]
