"""Data-parallel DP-SGD over torch.distributed ranks: which examples a rank holds, the sampling seed all ranks share,
and the one collective of a step (every rank's clipped sum added up, with rank 0's noise, drawn once).

Assumptions: the ranks of one training run are one trust domain (un-noised per-rank clipped sums and the sampling
seed travel between them: run them on hosts and a network you would trust with the data itself); what leaves the
run is the noised update only. Not here: starting the processes (compression.parallel), the clipping (engine.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from privacy.noise import secret_seed


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of ranks); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on `device`: nccl for CUDA, gloo for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def own_examples(index: torch.Tensor, *, rank: int, world: int) -> torch.Tensor:
    """The entries of `index` (example numbers) held by `rank`: example i lives on rank i % world (disjoint shards)."""
    return index[index % world == rank]


def shared_seed(seed: int | None) -> int:
    """The Poisson sampler's seed, equal on every rank: `seed` (the seeded test mode) or, when None, 63 bits of rank
    0's OS entropy sent to the others (secret: it says which examples each step used).

    Every rank then draws the same uniform for example i and keeps only its own examples, so the union of the ranks'
    batches is exactly the Poisson sample at q of the whole data that one process would draw (each example included
    independently with probability q): the accountant's assumption, and the ledger's q, are unchanged."""
    if seed is not None:
        return int(seed)
    value = torch.tensor([secret_seed() if rank_and_world()[0] == 0 else 0], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value)


def sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its sum over all ranks (one flat all-reduce). Every rank must call it with
    tensors of the same shapes, in the same order. A no-op in a single process."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def draws_noise() -> bool:
    """Whether this rank adds the Gaussian noise of a step: rank 0 alone, so that the summed update carries it once."""
    return rank_and_world()[0] == 0
