"""The `mgd-ray` command line, run as a user would (in-process for speed)."""

import pyarrow.parquet as pq

from mgd_ray.cli import main


def test_models_prints_the_paper_backbones(capsys):
    assert main(["models", "--backbones", "resnet18", "wide_resnet50_2", "--size", "512"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "wide_resnet50_2" in out
    assert "66.83" in out  # WRN-50-2 backbone params (M), the paper's T_W figure


def test_data_prepare_builtin_writes_a_manifest(tmp_path, capsys):
    root = tmp_path / "builtin"
    assert main(["data", "prepare", "builtin", "--root", str(root), "--fraction", "1/8"]) == 0
    out = capsys.readouterr().out
    assert "labeled 32, unlabeled 224, val 64" in out
    table = pq.read_table(next(root.glob("manifest_*.parquet")))
    assert table.num_rows == 320


def test_train_with_a_bad_config_reports_yaml_paths(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule: {iterations: 0}\ndata: {partition: 1/3}\noptim: {lr: -1}\nunknown_key: 1\n")
    assert main(["train", "baseline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "schedule.iterations: Input should be greater than 0" in err
    assert "data.partition: must be one of 1/16, 1/8, 1/4, 1/2" in err
    assert "optim.lr: Input should be greater than 0" in err
    assert "unknown_key: Extra inputs are not permitted" in err
