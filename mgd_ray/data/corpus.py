"""The built-in pretraining corpus: what ImageNet is to VOC, for the built-in dataset, with no download.

Why it exists: every network here would otherwise start from scratch, and a from-scratch student
on a laptop is limited by optimisation, not by labels (issue 4's note), whereas the paper's
backbones start from ImageNet weights. The corpus is another task than the target's segmentation:
image-level, multi-label *presence* classification (which kinds of shapes are visible) of built-in
scenes rendered from a random stream of their own. The target's images come from streams 0, 1 and 2
(train, val, test) of its data seed; the corpus uses stream ``CORPUS_STREAM``, so it holds no target
image, and no mask is ever a target here: a scene's label map only decides which classes it shows,
as ImageNet's image-level labels do. The same kinds of things appear in both, as they do in
ImageNet and VOC. Pretraining therefore never sees a target image or mask, and the target's
labeled fraction is unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mgd_ray.data.builtin import BUILTIN_CLASSES, GENERATOR_VERSION, SPLITS, scene_image
from mgd_ray.files import atomic_write

CORPUS_STREAM = 9  # the corpus's RNG stream; a target split's is its index in SPLITS (0, 1, 2)
MIN_VISIBLE = 0.02  # share of the pixels a class must cover to count as present
assert CORPUS_STREAM >= len(SPLITS)


@dataclass(frozen=True)
class CorpusSpec:
    """Which corpus: its own seed, size, and the shape classes it may show (background included)."""

    seed: int = 1000
    num_images: int = 3000
    num_val: int = 300  # held out from training: the pretraining accuracy is measured on them
    size: int = 32
    num_classes: int = len(BUILTIN_CLASSES)

    @property
    def labels(self) -> list[str]:
        """The presence labels: every foreground class (background is always there)."""
        return list(BUILTIN_CLASSES[1 : self.num_classes])

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self) | {"v": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()[
            :16
        ]


def corpus_item(spec: CorpusSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` (uint8 H×W×3) and its presence vector (float32, one entry per foreground class)."""
    image, label = scene_image(np.random.default_rng([spec.seed, CORPUS_STREAM, index]), spec.size, spec.num_classes)
    shares = np.bincount(label.ravel(), minlength=spec.num_classes)[1 : spec.num_classes] / label.size
    return image, (shares >= MIN_VISIBLE).astype(np.float32)


def generate_corpus(spec: CorpusSpec) -> tuple[np.ndarray, np.ndarray]:
    """All images (N×H×W×3 uint8) and presence targets (N×L float32), in index order."""
    items = [corpus_item(spec, i) for i in range(spec.num_images)]
    return np.stack([image for image, _ in items]), np.stack([target for _, target in items])


def load_corpus(spec: CorpusSpec, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """``generate_corpus``, kept as ``cache/corpus_<key>.npz`` (written atomically) for later jobs."""
    path = Path(cache) / f"corpus_{spec.key()}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["images"], stored["targets"]
    images, targets = generate_corpus(spec)
    atomic_write(path, lambda temporary: np.savez(temporary, images=images, targets=targets), suffix=".tmp.npz")
    return images, targets
