"""The seeded data stream: items and batches are functions of (seed, epoch, index), not of the global RNG."""

import torch

from mgd_ray.config import parse_job_config
from mgd_ray.data.stream import SeededView, derive_seed, prepare_manifest, with_manifest


class _RandomItems(torch.utils.data.Dataset):
    """Each item is three draws from the global CPU generator, as a random augmentation makes."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_seeded_view_items_are_a_function_of_seed_epoch_and_index():
    view = SeededView(_RandomItems(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    item = view[(2, 4)]
    # The caller's stream is untouched, and the item is what that seed draws (independent reference).
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(item, torch.rand(3, generator=torch.Generator().manual_seed(derive_seed(7, 2, 4))))
    assert torch.equal(view[(2, 4)], item)
    assert not torch.equal(view[(3, 4)], item) and not torch.equal(view[(2, 3)], item)


def test_with_manifest_names_the_prepared_manifest_once(tiny_data_cfg):
    cfg = parse_job_config("baseline", {"data": tiny_data_cfg})
    assert cfg.data.manifest is None
    ready = with_manifest(cfg)
    assert ready.data.manifest == prepare_manifest(cfg.data) and ready.data.manifest.is_file()
    assert ready.data.model_copy(update={"manifest": None}) == cfg.data  # nothing else changes
    assert with_manifest(ready) == ready  # a prepared config is left as it is


def test_unlabeled_draws_independent_by_default_and_the_official_shared_order_on_request(tiny_data_cfg, tiny_job_data):
    """independent: u0 and u1 are other images (mostly); shared_order: the official loaders' shared
    sampler seed, the same images in the same order, each augmented on its own. u0 and the labeled
    batch do not depend on the choice."""
    from mgd_ray.config import ScheduleConfig
    from mgd_ray.data.stream import batches
    from mgd_ray.distributed import DistEnv

    env = DistEnv(0, 1, torch.device("cpu"))
    steps = {}
    for draw in ("independent", "shared_order"):
        schedule = ScheduleConfig(batch_labeled=2, batch_unlabeled=3, seed=5, unlabeled_draw=draw)
        stream = batches(tiny_job_data, schedule, 0, env, 0, unlabeled=True)
        steps[draw] = [next(stream) for _ in range(4)]
    for independent, shared in zip(steps["independent"], steps["shared_order"], strict=True):
        assert torch.equal(independent.x_l, shared.x_l) and torch.equal(independent.u0, shared.u0)
        n = len(shared.u0)
        assert shared.ids["unlabeled"][:n] == shared.ids["unlabeled"][n:]  # u1: u0's images ...
        assert not torch.equal(shared.u0, shared.u1)  # ... in views of their own
    independent_ids = [b.ids["unlabeled"] for b in steps["independent"]]
    assert any(ids[:3] != ids[3:] for ids in independent_ids)
