"""After data-parallel training every rank must hold the same weights; check it, cheaply."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def replicas_identical(model: torch.nn.Module) -> bool | None:
    """True when every rank's weights equal rank 0's (one float64 sum per tensor, gathered once).

    None when there is nothing to compare: a single process, or ZeRO-3 (each rank holds a shard).
    A False means ranks trained apart (no gradient all-reduce): the saved rank-0 model is not the
    result of the data-parallel run.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    params = list(model.parameters())
    if any(hasattr(p, "ds_numel") for p in params):  # ZeRO-3 partitioned parameters
        return None
    sums = torch.stack([p.detach().double().sum().cpu() for p in params])
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    if dist.get_backend() == "nccl":
        sums, gathered = sums.cuda(), [g.cuda() for g in gathered]
    dist.all_gather(gathered, sums)
    same = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
    if not same:
        log.error(
            "the ranks hold different weights after training: gradients were not all-reduced, so this "
            "was not one data-parallel run. Nothing saved; please report it with this log"
        )
    return same
