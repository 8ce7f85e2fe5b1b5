"""A study file for a user's folder dataset (``mgd-ray init``): the paper's method on their images.

The file is written as commented YAML: the paper's teachers (ResNet-101, Wide ResNet-50-2) and
ResNet-18 student, its loss weights with a small search around them, Sup-only and KD beside MGD,
a crop that fits the images and a schedule in epochs of the unlabeled images, and a comment on
each choice a user may want to change. It validates as it is (``load_study``).
"""

from __future__ import annotations

import json
import re
import socket
import statistics
from pathlib import Path

from PIL import Image

from mgd_ray.config import DataConfig
from mgd_ray.data.folder import folder_roles

EPOCHS = 40  # CPS/MGD's schedules: tens of epochs over the unlabeled images
SIZE_SAMPLE = 200  # image headers read to choose the crop


def online(host: str = "download.pytorch.org", timeout: float = 2.0) -> bool:
    """Whether torchvision's ImageNet weights can be downloaded from here."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def crop_for(images: list[Path]) -> int:
    """The paper's 512, or the median short side (a multiple of 32, at least 64) when images are smaller."""
    sides = []
    for path in images[:SIZE_SAMPLE]:
        with Image.open(path) as image:  # the header only
            sides.append(min(image.size))
    side = int(statistics.median(sides)) // 32 * 32
    return max(64, min(512, side))


def study_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.resolve().name).strip("-._") or "my-data"
    return name if name[0].isalnum() else f"data-{name}"


def folder_study(root: Path, pretrained: bool, gpus: int) -> str:
    """The study file's text for the folder dataset at ``root`` (checked first: every list problem raises)."""
    roles, class_names = folder_roles(DataConfig(dataset="folder", root=root))
    crop = crop_for([s.image for s in roles.labeled + roles.unlabeled + roles.val])
    batch = 2 if gpus else 1
    steps_per_epoch = max(1, len(roles.unlabeled) // (batch * max(1, gpus)))
    iterations = EPOCHS * steps_per_epoch
    eval_every = max(1, iterations // 10)
    weights = "pretrained: imagenet" if pretrained else "pretrained: null"
    weights_note = (
        "torchvision's ImageNet weights, as in the paper (downloaded once into the torch hub cache)"
        if pretrained
        else "no ImageNet weights could be downloaded from here: set `pretrained: imagenet` where they can"
        " be (or put them in the torch hub cache); from scratch, students are limited by optimisation"
    )
    if gpus:
        resources = f"{{workers: {gpus}, cpus_per_worker: 8, gpus_per_worker: 1}}  # one DDP worker per GPU"
    else:
        resources = (
            "{workers: 1, cpus_per_worker: 2}  # no GPU here: the paper's models train for days on a CPU;"
            " run this on GPUs (README: Scaling out)"
        )
    return f"""# A study of {root}: {len(class_names)} classes ({", ".join(class_names)}),
# {len(roles.labeled)} labeled training images, {len(roles.unlabeled)} unlabeled, {len(roles.val)} val, {len(roles.test)} test
# (written by `mgd-ray init`; `mgd-ray validate` and `mgd-ray data check` this file, then `mgd-ray run` it).
# Models: the paper's teachers (T_D ResNet-101, T_W Wide ResNet-50-2, pretrained with CPS on your labeled and
# unlabeled images) and its ResNet-18 student (or mobilenet_v2 for the smallest model). Weights: {weights_note}.
name: {study_name(root)}
description: MGD on {root.name}, {len(roles.labeled)} labeled and {len(roles.unlabeled)} unlabeled images.
data:
  dataset: folder
  root: {json.dumps(str(root))}
  # val: 0.2 of the labeled images by default; give id lists (their images need masks) to choose them:
  # val: {json.dumps(str(root / "val.txt"))}
  # test: {json.dumps(str(root / "test.txt"))}    # or a share: `test: 0.1`
  crop_size: {crop}  # the median short side of your images, at most the paper's 512
  scales: [0.5, 0.75, 1.0, 1.5, 1.75, 2.0]
  loader_workers: 2
teachers:
  T_D:
    model: {{backbone: resnet101, output_stride: 16, {weights}}}
    recipe: &teacher_recipe
      optim: {{lr: 0.0025, momentum: 0.9, weight_decay: 1.0e-4}}
      # {EPOCHS} epochs of your unlabeled images at batch {batch} per GPU, as CPS trains; more for better teachers:
      # a teacher is pretrained once and reused from MLflow by every later study of these images.
      schedule: {{iterations: {iterations}, eval_every: {eval_every}, batch_labeled: {batch}, batch_unlabeled: {batch}, eval_batch: 4}}
  T_W:
    model: {{backbone: wide_resnet50_2, output_stride: 16, {weights}}}
    recipe: *teacher_recipe
student: {{backbone: resnet18, output_stride: 16, {weights}}}
schedule: {{iterations: {iterations}, eval_every: {eval_every}, batch_labeled: {batch}, batch_unlabeled: {batch}, eval_batch: 4}}
optim: {{lr: 0.0025, momentum: 0.9, weight_decay: 1.0e-4}}
# The paper's loss weights (image level from T_D, region level from T_W) and a search around them.
distill:
  losses: {{image_teachers: [T_D], region_teachers: [T_W], lambda_1: 0.002, lambda_2: 100, pool_size: 7}}
search:
  lambda_1: {{low: 0.0005, high: 0.01, log: true}}
  lambda_2: {{low: 20, high: 500, log: true}}
searcher: {{sampler: tpe, seed: 0, num_samples: 8, max_concurrent: 2}}
scheduler: {{type: asha, grace_period: 2, reduction_factor: 2}}
# kd: the paper's KD, on the labeled images only; the second kd also distils on the unlabeled images
# as MGD does: the strongest plain distillation to beat with your data.
baselines:
  - {{method: supervised}}
  - {{method: kd, teacher: T_D}}
  - {{method: kd, teacher: T_D, distill_on: labeled+unlabeled}}
seeds: [0]  # [0, 1, 2]: every baseline and the best configuration on each, mean and spread in the report
resources: {resources}
mlflow: {{tracking_uri: "sqlite:///mlflow.db"}}
storage_path: mgd_ray_runs
"""
