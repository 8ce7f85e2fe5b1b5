"""The pretraining corpus: seeded, cached, labelled by presence only, and never a target image."""

import numpy as np
import pytest

from mgd_ray.data import corpus as corpus_module
from mgd_ray.data.builtin import SPLITS, builtin_image
from mgd_ray.data.corpus import CORPUS_STREAM, MIN_VISIBLE, CorpusSpec, corpus_item, generate_corpus, load_corpus

SPEC = CorpusSpec(seed=0, num_images=24, num_val=4, size=32, num_classes=6)


def test_presence_targets_are_the_visible_classes_of_each_scene():
    for index in range(SPEC.num_images):
        rng = np.random.default_rng([SPEC.seed, CORPUS_STREAM, index])
        image, label = corpus_module.scene_image(rng, SPEC.size, SPEC.num_classes)
        got_image, target = corpus_item(SPEC, index)
        np.testing.assert_array_equal(got_image, image)
        classes, counts = np.unique(label, return_counts=True)
        visible = {int(c) for c, n in zip(classes, counts, strict=True) if c > 0 and n >= MIN_VISIBLE * label.size}
        assert {i + 1 for i in np.flatnonzero(target)} == visible
    assert SPEC.labels == ["striped_disc", "checkered_triangle", "dotted_ring", "noisy_cross", "shaded_ellipse"]


def test_the_corpus_shares_no_image_with_the_target_data():
    """Even with the target's own data seed, the corpus draws from another random stream."""
    assert CORPUS_STREAM not in range(len(SPLITS))
    images, _ = generate_corpus(SPEC)
    target = {
        builtin_image(SPEC.seed, split, i, 32, 6)[0].tobytes() for split in SPLITS for i in range(SPEC.num_images)
    }
    assert not {image.tobytes() for image in images} & target
    assert len({image.tobytes() for image in images}) == SPEC.num_images


def test_the_corpus_is_seeded_and_cached(tmp_path, monkeypatch):
    images, targets = load_corpus(SPEC, tmp_path)
    again, _ = generate_corpus(SPEC)
    np.testing.assert_array_equal(images, again)
    other, _ = generate_corpus(CorpusSpec(seed=1, num_images=4, num_val=1))
    assert not np.array_equal(other, images[:4])
    assert [p.name for p in tmp_path.iterdir()] == [f"corpus_{SPEC.key()}.npz"]
    monkeypatch.setattr(corpus_module, "generate_corpus", lambda spec: pytest.fail("regenerated"))
    cached, cached_targets = load_corpus(SPEC, tmp_path)
    np.testing.assert_array_equal(cached, images)
    np.testing.assert_array_equal(cached_targets, targets)
    assert CorpusSpec(seed=1).key() != CorpusSpec().key()
