"""The `mgd-ray` command line, run as a user would (in-process for speed)."""

import subprocess
import sys
from pathlib import Path

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
    bad.write_text("schedule: {iterations: 0}\ndata: {partition: 3/2}\noptim: {lr: -1}\nunknown_key: 1\n")
    assert main(["train", "baseline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "schedule.iterations: Input should be greater than 0" in err
    assert "data.partition: must be a fraction in (0, 1] such as 1/16 or 0.03, or all (got '3/2')" in err
    assert "optim.lr: Input should be greater than 0" in err
    assert "unknown_key: Extra inputs are not permitted" in err


def test_validate_and_smoke_load_neither_torch_nor_mlflow_nor_ray():
    """`mgd-ray validate` answers in a fraction of a second: it must not import the heavy libraries."""
    studies = Path(__file__).parents[1] / "studies"
    code = (
        "import sys; from mgd_ray.cli import main; from mgd_ray.study.config import load_study; "
        "from mgd_ray.study.smoke import smoke; "
        f"assert main(['validate', {str(studies / 'quickstart.yaml')!r}]) == 0; "
        f"smoke(load_study({str(studies / 'paper_table1_voc_resnet18.yaml')!r})); "
        "print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
