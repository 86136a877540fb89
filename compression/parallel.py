"""Starting the ranks of a data-parallel DP training run (torch.distributed): this process is rank 0 and keeps the
model, the progress callback and the checkpoints; the other ranks are spawned worker processes that train a copy.

Not here: what a rank does (compression.train.train_rank) or how the ranks combine a step (privacy.distributed).
"""
from __future__ import annotations

import copy
import logging
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from privacy.distributed import backend_for

log = logging.getLogger(__name__)
_HOST = "127.0.0.1"


def run_ranks(train_rank: Callable[..., int], run: dict, *, processes: int,
              on_step: Callable[[int, dict], None] | None) -> int:
    """Run `train_rank(**run)` on `processes` ranks of one process group and return rank 0's result.

    Rank 0 runs here, with `on_step`, and trains `run["model"]` in place; ranks 1.. are spawned processes (a fresh
    interpreter each: safe beside threads and CUDA), which receive `run` pickled (the loss function must be picklable:
    a module-level function or a partial of one) and train their own copy of the model. The backend is nccl for a
    model on CUDA (untested: dp_train itself trains on the CPU today), gloo otherwise. All ranks run on this host.
    """
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed process group: one data-parallel "
                           "training run at a time")
    try:
        pickle.dumps(run["loss_fn"])
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ValueError(f"processes > 1 needs a picklable loss_fn (a module-level function or a partial of one): "
                         f"{err}") from None
    device = next(run["model"].parameters()).device
    backend = backend_for(device)
    store = dist.TCPStore(_HOST, 0, world_size=processes, is_master=True, wait_for_workers=False)
    context = mp.start_processes(_worker, args=(train_rank, run, processes, store.port, backend,
                                                torch.get_num_threads()),
                                 nprocs=processes - 1, join=False, start_method="spawn")
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=processes)
        try:
            result = train_rank(**run, on_step=on_step)
        finally:
            dist.destroy_process_group()
    except BaseException as err:
        failed = _worker_failure(context) if isinstance(err, RuntimeError) else None
        _stop(context)
        if failed is not None:  # rank 0's error is the lost connection; the cause is the worker's
            raise failed from err
        raise
    while not context.join():  # raises, naming the rank, if a worker failed
        pass
    return result


def _worker(index: int, train_rank: Callable[..., int], run: dict, world: int, port: int, backend: str,
            threads: int) -> None:
    """Rank `index + 1`: its own copy of the model (spawn hands over the parent's tensors in shared memory, which this
    rank must not update), then the same loop as rank 0."""
    torch.set_num_threads(threads)
    rank = index + 1
    run = {**run, "model": copy.deepcopy(run["model"])}
    store = dist.TCPStore(_HOST, port, world_size=world, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    try:
        train_rank(**run)
    finally:
        dist.destroy_process_group()


def _worker_failure(context) -> Exception | None:
    """The error of a worker that failed (waiting a few seconds for its report), or None."""
    try:
        context.join(timeout=10)
    except Exception as err:  # torch.multiprocessing's ProcessRaisedException / ProcessExitedException
        return err
    return None


def _stop(context) -> None:
    """Rank 0 failed (or was interrupted): end the workers, which would otherwise wait on it."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(timeout=30)
