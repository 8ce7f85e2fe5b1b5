"""What the built-in-data benchmarks share (not a benchmark): the quickstart's data, a job schedule,
and a backbone pretrained on the built-in corpus, run as the package's own plain loops."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def data_config(root: Path, partition: str) -> dict[str, Any]:
    """The quickstart's built-in dataset (studies/quickstart.yaml) at ``partition``."""
    return {
        "dataset": "builtin",
        "root": str(root),
        "partition": partition,
        "builtin": {"num_train": 256, "num_val": 64, "size": 32, "num_classes": 4},
        "crop_size": 32,
        "scales": [0.75, 1.0, 1.25],
    }


def schedule(iterations: int, eval_every: int, seed: int) -> dict[str, Any]:
    """The quickstart's batches at ``iterations``, evaluated every ``eval_every``."""
    return {
        "iterations": iterations,
        "eval_every": eval_every,
        "batch_labeled": 4,
        "batch_unlabeled": 4,
        "eval_batch": 32,
        "seed": seed,
    }


def pretrain_backbone(
    backbone: str, recipe: Any, weights: Path, corpus_cache: Path
) -> tuple[str, dict[str, float], float]:
    """Pretrain ``backbone`` with ``recipe`` (a ``PretrainRecipe``) on one thread; its ``backbone.pt``
    goes to ``weights``. Returns (backbone, last metrics, seconds)."""
    import torch

    from mgd_ray.config import PretrainJobConfig
    from mgd_ray.jobs.pretrain import BACKBONE_FILE, run_pretrain

    torch.set_num_threads(1)
    cfg = PretrainJobConfig(
        corpus=recipe.corpus,
        model={"backbone": backbone},
        optim=recipe.optim,
        schedule=recipe.schedule,
        cache=corpus_cache,
    )
    final: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mgd_pretrain_{backbone}_") as tmp:
        run_pretrain(cfg, lambda metrics, _: final.update(metrics), Path(tmp))
        weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / f"step_{recipe.schedule.iterations:08d}" / BACKBONE_FILE, weights)
    return backbone, final, time.perf_counter() - start
