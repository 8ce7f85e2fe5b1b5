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
