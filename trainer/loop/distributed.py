"""Data-parallel training over several processes, launched by `torchrun` (or `accelerate launch`,
which sets the same environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Every rank holds the whole model and the same LoRA, seed, batch order and optimizer. A step's
batch is `batch_size` × ranks examples, drawn as one process would draw them (the same noise and
σ), and each rank trains a contiguous slice of it; the LoRA's gradients are summed over the ranks
once per optimizer step (after gradient accumulation, before clipping), so every rank steps the
same weights and the run is the one a single process would train with the whole batch. The loss
is summed the same way (each rank's part is already divided by the whole batch): the mean over
all ranks' examples.

Only rank 0 writes: the encode cache (the others wait at a barrier, then read it), checkpoints,
samples, the loss history and the LoRA file. Rank 0 also decides when to stop (Ctrl-C): the
other ranks ignore SIGINT, and they wait in the next step's all-reduce while rank 0 writes its
checkpoint and exits; torchrun then ends them. A run with one process (the nodes, the plain
command line) never comes here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..log import ROOT, logger

log = logger(__name__)
T = TypeVar("T")

TIMEOUT = timedelta(minutes=60)  # how long a rank waits for the others (rank 0 rendering samples, encoding)
BUCKET_ELEMENTS = 1 << 24  # gradients are summed in flat buckets of up to this many values (64 MiB in fp32)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes files and decides when to stop."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """Which of a batch's `n` examples this rank trains: a contiguous slice (empty when `n` < ranks)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def reduce_step(self, params: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum `params`' gradients and the scalars `values` over the ranks, in place of this rank's
        own; returns the summed values. A parameter no rank gave a gradient keeps none (as in one
        process, the optimizer skips it)."""
        device = values[0].device
        flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
        summed = torch.cat([torch.stack([v.float().reshape(()) for v in values]), flags])
        dist.all_reduce(summed)
        values, flags = summed[:len(values)].unbind(), summed[len(values):].tolist()
        reached = [p for p, f in zip(params, flags) if f > 0]
        for p in reached:
            if p.grad is None:  # this rank trained none of the examples that reach p
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in reached]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
        return list(values)

    def barrier(self) -> None:
        dist.barrier()

    def from_primary(self, value: T) -> T:
        """Rank 0's `value`, on every rank (a small picklable object: a path, a name)."""
        box = [value if self.primary else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self) -> None:
        """The run is over on every rank: wait for the others (rank 0 writes the last files), then part."""
        dist.barrier()
        dist.destroy_process_group()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients grouped by dtype and device into buckets of about BUCKET_ELEMENTS values."""
    by_kind: dict[tuple, list[list[torch.Tensor]]] = {}
    for g in grads:
        buckets = by_kind.setdefault((g.dtype, g.device), [[]])
        if buckets[-1] and sum(t.numel() for t in buckets[-1]) + g.numel() > BUCKET_ELEMENTS:
            buckets.append([])
        buckets[-1].append(g)
    return [b for buckets in by_kind.values() for b in buckets if b]


def from_env() -> Ranks | None:
    """Join the run torchrun / accelerate launch started (WORLD_SIZE > 1): NCCL on GPUs, gloo on
    CPUs; each rank uses the GPU of its LOCAL_RANK. None when this is the only process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                               "start at most one process per GPU (torchrun --nproc_per_node).")
        torch.cuda.set_device(local_rank)  # "cuda" is this rank's GPU from now on
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                **({"device_id": torch.device("cuda", local_rank)} if cuda else {}))
    ranks = Ranks(rank, world, local_rank)
    if not ranks.primary:  # one console: the other ranks say only what goes wrong
        logging.getLogger(ROOT).setLevel(logging.WARNING)
    log.info("Data-parallel run: %d processes (%s).", world, dist.get_backend())
    return ranks


def check_batch(ranks: Ranks, batch_size: int, examples: int) -> None:
    """Before training: every rank gets at least one photo of every full batch."""
    if batch_size * ranks.world > examples:
        raise ValueError(f"batch_size {batch_size} on {ranks.world} processes is a batch of {batch_size * ranks.world} "
                         f"photos, but the dataset has {examples}; start fewer processes (torchrun --nproc_per_node) "
                         "or add photos.")


def primary_first(ranks: Ranks | None, work: Callable[[], T], what: str = "") -> T:
    """`work()` on rank 0, then on the others once rank 0 is done: rank 0 encodes the dataset into
    the disk cache, the others read it. With one process: just `work()`."""
    if ranks is None:
        return work()
    if ranks.primary:
        result = work()  # should it fail, the others wait here until torchrun ends them
        ranks.barrier()
        return result
    ranks.barrier()
    return work()


def rebatched(queue: list[list[int]], size: int, bucket_of: Callable[[int], tuple]) -> list[list[int]]:
    """An epoch's remaining batches cut again to batches of `size` (a checkpoint resumed with
    another number of processes): the same examples in the same order, each batch of one bucket,
    batches ordered by their first example; no random draw, so the generator's state carries on."""
    order = [i for batch in queue for i in batch]
    by_bucket: dict[tuple, list[tuple[int, int]]] = {}
    for position, i in enumerate(order):
        by_bucket.setdefault(bucket_of(i), []).append((position, i))
    batches = [ids[k:k + size] for ids in by_bucket.values() for k in range(0, len(ids), size)]
    return [[i for _, i in batch] for batch in sorted(batches, key=lambda b: b[0][0])]

