"""Concurrent model lines: each independent line of a study (privacy.scope: line) is one Prefect task submitted to
prefect-dask's DaskTaskRunner (a running Dask scheduler, or a local cluster of worker processes); its
stages run inside it, in a Dask worker process, as they would in the flow's process. Not here: what a line runs
(flows/kinds.py). The dataset ledger keeps concurrent stages race-free (an exclusive transaction per check)."""
from __future__ import annotations

from prefect import task
from prefect.futures import wait

from flows.config import ExecutionSection
from flows.kinds import Run, timed_line
from flows.plan import Stage
from tasks.caching import NOT_CACHED
from tasks.refs import ModelRef

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@task(name="model_line", **NOT_CACHED)
def model_line(*, stages: list[Stage], run: Run) -> tuple[list[ModelRef], dict]:
    """One independent line, in a Dask worker: its models in run order, and its timing (`flows.kinds.timed_line`)."""
    if run.cfg.execution.local_workers is not None:  # the env alone is too late where torch came in with the worker
        import torch

        torch.set_num_threads(run.cfg.execution.threads_per_worker)
    models, _, timing = timed_line(stages, run, run.teacher)
    return models, timing


def task_runner(execution: ExecutionSection):
    """The DaskTaskRunner `execution` names. A local cluster's workers get this process's Prefect API (they would
    otherwise each start a temporary server of their own) and `threads_per_worker` torch threads each (N workers of
    T threads use N x T cores, without torch's threads fighting over them); each worker runs one line at a time."""
    from prefect.settings import get_current_settings
    from prefect_dask import DaskTaskRunner

    if execution.dask is not None:
        return DaskTaskRunner(address=execution.dask)
    api = get_current_settings().api.url
    threads = {name: str(execution.threads_per_worker) for name in THREAD_VARIABLES}
    env = {**threads, **({"PREFECT_API_URL": str(api)} if api else {})}
    return DaskTaskRunner(cluster_kwargs={"n_workers": execution.local_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None, "env": env})


def run_concurrently(lines: dict[str, list[Stage]], run: Run) -> tuple[list[ModelRef], dict[str, dict]]:
    """Every line at once on the cluster: the models in line order (the sequential run's order), and each line's
    timing. A failed line fails the study after every other line has finished (their stages are kept for the
    rerun)."""
    with task_runner(run.cfg.execution) as runner:
        futures = {name: runner.submit(model_line, parameters={"stages": line, "run": run})
                   for name, line in lines.items()}
        wait(list(futures.values()))
        results = {name: future.result() for name, future in futures.items()}  # raises a failed line's error
    return [model for models, _ in results.values() for model in models], {
        name: timing for name, (_, timing) in results.items()}
