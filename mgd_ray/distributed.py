"""The one place for ranks, devices, reductions and DDP wrapping; everything else is single-process code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank, world size and device of this process (CUDA when present, else CPU)."""
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    world = dist.get_world_size() if initialized else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, device)


def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Mean over ranks of scalar metrics (identity on one process)."""
    if env.world_size == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / env.world_size).tolist(), strict=True))


def replica_spread(model: nn.Module, env: DistEnv) -> float:
    """Largest difference across ranks of per-tensor parameter sums: 0 while replicas agree.

    A cheap check that DDP keeps the copies identical (it would expose, e.g., a rank whose
    optimiser stepped on different gradients).
    """
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(env.device)
    if env.world_size == 1:
        return 0.0
    gathered = [torch.empty_like(sums) for _ in range(env.world_size)]
    dist.all_gather(gathered, sums)
    stacked = torch.stack(gathered)
    return float((stacked.max(0).values - stacked.min(0).values).abs().max())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all ranks, on any device.

    torch's SyncBatchNorm runs on GPU only; this one all-reduces per-channel sums with the
    autograd-aware ``torch.distributed.nn`` collective, so CPU (gloo) multi-worker training
    normalises exactly like a single worker holding the whole batch. Eval mode is plain BN.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        n = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n])
        stats = dist_fn.all_reduce(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = stats[c : 2 * c] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * total / (total - 1), alpha=m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (keeping weights and statistics) by ``GlobalBatchNorm2d``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.to(next(child.parameters(), child.running_mean).device)
            setattr(module, name, bn)
        else:
            convert_global_batchnorm(child)
    return module


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """Move to the device and wrap in DDP when distributed, with BatchNorm over the global batch.

    GPU: torch's SyncBatchNorm (NCCL). CPU: ``GlobalBatchNorm2d``, since SyncBatchNorm is GPU-only.
    """
    model = model.to(env.device)
    if env.world_size == 1:
        return model
    if env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index])
    return nn.parallel.DistributedDataParallel(convert_global_batchnorm(model))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
