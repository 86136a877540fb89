"""Prefect tasks of a sweep: start a grid cell as a flow run of the `study` deployment (any worker of its pool picks it
up), wait for every cell, and gather their results tables into the sweep's table and plots under its MLflow run.
A cell's results come from its study folder (storage every worker reaches), never from Prefect's result storage."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from compression.report import sweep_frame, write_sweep
from tasks import tracking
from tasks.caching import NOT_CACHED
from tasks.console import run_logger

POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One cell of the grid: its values, the study it runs (name, folder) and the study run's parameters."""

    values: dict
    study: str
    study_dir: str
    parameters: dict


@dataclass(frozen=True, kw_only=True)
class CellRun:
    """A cell's flow run once final: its state, and where the time went (wall_s: from creating the run to seeing it
    final; run_s: the study flow's own running time, server clock; overhead_s: the difference; of it, pickup_s is
    scheduling, worker pickup, process start and the import of the flow's code, server clock)."""

    flow_run_id: str
    flow_run_name: str
    state: str
    message: str
    wall_s: float
    run_s: float
    pickup_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.run_s


@task(name="start_cell", **NOT_CACHED)
def start_cell(*, cell: Cell, deployment: str) -> tuple[str, float]:
    """Create the cell's flow run of `deployment` (returns at once; a worker runs it): (flow run id, start time)."""
    from prefect.deployments import run_deployment

    began = time.monotonic()
    flow_run = run_deployment(deployment, parameters=cell.parameters, timeout=0, as_subflow=True,
                              flow_run_name=cell.study)
    run_logger().info("cell %s: flow run %s of %s", cell.values, flow_run.name, deployment)
    return str(flow_run.id), began


@task(name="wait_for_cells", **NOT_CACHED)
def wait_for_cells(*, started: list[tuple[str, float]], timeout_s: float | None = None) -> list[CellRun]:
    """Poll the API until every started flow run is final (one request per poll for all of them)."""
    from prefect.client.orchestration import get_client

    ids = [flow_run_id for flow_run_id, _ in started]
    done: dict[str, CellRun] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while len(done) < len(ids):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - len(done)} cell(s) not finished after {timeout_s:g} s")
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
                any_=[i for i in ids if i not in done])))
            now = time.monotonic()
            for run in runs:
                if run.state is not None and run.state.is_final():
                    began = dict(started)[str(run.id)]
                    ran = run.start_time and run.end_time
                    done[str(run.id)] = CellRun(
                        flow_run_id=str(run.id), flow_run_name=run.name, state=run.state.type.value,
                        message=run.state.message or "", wall_s=now - began,
                        run_s=(run.end_time - run.start_time).total_seconds() if ran else 0.0,
                        pickup_s=(run.start_time - run.created).total_seconds() if ran else 0.0)
            if len(done) < len(ids):
                time.sleep(POLL_S)
    return [done[i] for i in ids]


@task(name="open_sweep", **NOT_CACHED)
def open_sweep(*, tracking_uri: str, experiment: str, sweep_key: str, name: str, config: dict) -> str:
    """The sweep's parent run in MLflow (the same run again when the same sweep reruns)."""
    return tracking.study_run(uri=tracking_uri, experiment=experiment, study_key=sweep_key, name=name,
                              config=config, kind="sweep")


@task(name="sweep_table", **NOT_CACHED)
def sweep_table(*, cells: list[Cell], runs: list[CellRun], tracking_uri: str, parent_run_id: str,
                output_dir: str) -> list[dict]:
    """The sweep's privacy-utility table over every completed cell (sweep.csv/.md, metric vs epsilon and vs size
    plots) and its cells' timings (cells.csv), in `output_dir`/results and logged to the sweep's run; returns the
    table's rows."""
    timings = pd.DataFrame([{"cell": c.study, **{k: str(v) for k, v in c.values.items()}, "state": r.state,
                             "flow_run": r.flow_run_name, "wall_s": round(r.wall_s, 1), "run_s": round(r.run_s, 1),
                             "overhead_s": round(r.overhead_s, 1), "pickup_s": round(r.pickup_s, 1)}
                            for c, r in zip(cells, runs)])
    completed = [c for c, r in zip(cells, runs) if r.state == "COMPLETED"]
    tables = [pd.read_csv(Path(c.study_dir) / "results" / "results.csv") for c in completed]
    frame = sweep_frame([{"cell": c.study, **c.values} for c in completed], tables)
    metric = next((col for col in tables[0].columns if col not in _NOT_METRIC), "metric") if tables else "metric"
    directory = Path(output_dir) / "results"
    write_sweep(frame, directory, metric=metric)
    timings.to_csv(directory / "cells.csv", index=False)
    run = tracking.StageRun(tracking.client(tracking_uri), parent_run_id)
    run.artifact(directory, "results")
    run.metrics({"cells_completed": len(completed), "cells": len(cells),
                 "max_overhead_s": float(timings["overhead_s"].max())})
    run_logger().info("sweep: %d of %d cells completed; orchestration overhead per cell %s s", len(completed),
                      len(cells), ", ".join(f"{v:.1f}" for v in timings["overhead_s"]))
    return frame.to_dict(orient="records")


_NOT_METRIC = {"stage", "line", "sparsity", "parameters", "nonzero_parameters", "size_mb", "sparse_size_mb",
               "epsilon", "delta"}
