"""`mgd-ray init`: a study file for a folder of partly labeled images that validates and runs."""

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mgd_ray.cli import main
from mgd_ray.config import ModelConfig, ScheduleConfig
from mgd_ray.jobs.baselines import run_baseline
from mgd_ray.study.config import load_study
from mgd_ray.study.plan import Plan, baseline_job
from mgd_ray.study.smoke import smoke
from mgd_ray.study.template import crop_for, folder_study, study_name


def make_data(root: Path) -> Path:
    """Twelve 100×80 images, four with masks of two classes."""
    rng = np.random.default_rng(3)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(root / "images" / f"p{i:02d}.jpg")
        if i < 4:
            mask = np.zeros((80, 100), np.uint8)
            mask[20:60, 10 + 10 * i : 60] = 1 + i % 2
            Image.fromarray(mask).save(root / "labels" / f"p{i:02d}.png")
    (root / "classes.txt").write_text("background\nleaf\nstem\n")
    return root


def test_the_study_describes_the_folder_and_validates(tmp_path):
    root = make_data(tmp_path / "my plants")
    text = folder_study(root, pretrained=False, gpus=2)
    assert "3 classes (background, leaf, stem)" in text and "3 labeled training images, 8 unlabeled, 1 val" in text
    raw = yaml.safe_load(text)
    assert raw["name"] == "my-plants" and raw["data"] == {
        "dataset": "folder",
        "root": str(root),
        "crop_size": 64,  # the images' short side, 80, down to a multiple of 32
        "scales": [0.5, 0.75, 1.0, 1.5, 1.75, 2.0],
        "loader_workers": 2,
    }
    # 40 epochs of 8 unlabeled images at 2 per GPU on 2 GPUs: 2 steps an epoch.
    assert raw["schedule"]["iterations"] == 80 and raw["teachers"]["T_W"]["recipe"]["schedule"]["iterations"] == 80
    assert raw["resources"] == {"workers": 2, "cpus_per_worker": 8, "gpus_per_worker": 1}
    assert raw["student"]["pretrained"] is None and raw["teachers"]["T_D"]["model"]["backbone"] == "resnet101"
    assert yaml.safe_load(folder_study(root, pretrained=True, gpus=0))["student"]["pretrained"] == "imagenet"
    assert crop_for([root / "images" / "p00.jpg"]) == 64 and study_name(Path("/x/_odd name!")) == "odd-name"


def test_init_writes_a_study_that_runs(tmp_path, capsys):
    root = make_data(tmp_path / "plants")
    out = tmp_path / "plants.yaml"
    assert main(["init", "--data", str(root), "--out", str(out), "--pretrained", "none", "--gpus", "0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["init", "--data", str(root), "--out", str(out)]) == 2  # never replaced silently
    assert f"{out} exists" in capsys.readouterr().err
    study = load_study(out)
    assert main(["validate", str(out)]) == 0 and main(["data", "check", str(out)]) == 0
    assert smoke(study).data.dataset == "builtin"  # `mgd-ray run --smoke` shrinks it like any study
    # A tiny real run on the folder's images, through the study's own job builder.
    tiny = study.model_copy(update={"student": ModelConfig(backbone="mobilenet_v2")})
    plan = Plan(tiny, tmp_path / "run", "", "", "")
    cfg = baseline_job(plan, 0, 0, tmp_path / "run" / "sup")
    cfg = cfg.model_copy(update={"schedule": ScheduleConfig(iterations=2, eval_every=2, batch_labeled=2, eval_batch=2)})
    reports = []
    run_baseline(cfg, lambda m, c: reports.append(m), tmp_path / "ckpt")
    assert [r["step"] for r in reports] == [2] and 0 <= reports[0]["val/mIoU"] <= 1


def test_init_names_the_problems_of_the_folder(tmp_path, capsys):
    root = make_data(tmp_path / "plants")
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(root / "labels" / "ghost.png")
    assert main(["init", "--data", str(root), "--out", str(tmp_path / "s.yaml")]) == 2
    assert "masks without an image: ghost" in capsys.readouterr().err and not (tmp_path / "s.yaml").exists()
