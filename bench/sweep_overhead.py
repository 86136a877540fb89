"""Benchmark: a sweep cell's orchestration overhead over the study alone (issue 16). Not a unit test; writes JSON
under bench/results/. `python bench/sweep_overhead.py [--cells 1] [--out FILE]`.

On loopback: a `prefect server`, the `dpcompress` process work pool with one worker (one slot per cell plus one for
the sweep's own run, so no cell waits for a slot), `flows/prefect.yaml` deployed. The tiny teacher-only study of the
suite's deployment tests (a 2-layer BERT from a config, 48 train rows) runs
1. alone, as a user runs it: `dpcompress run` against the same server, timed from the command's start to its exit;
2. as the cells of a sweep (`privacy.epsilon` over `--cells` values) through the `sweep` deployment.
Per cell (the sweep's cells.csv, server clock): wall_s from the cell's creation until the sweep saw it final, run_s
the study flow's own running time, pickup_s creation to running (scheduling, worker poll, process start, the import
of the flow's code). The overhead over the study alone is wall_s - run_s, and, as a user sees it, wall_s minus the
`dpcompress run` wall time (which pays its own process start and imports).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_flows_deploy import GLUE, Processes, _run_cli, _start_server, _wait_healthy  # noqa: E402
from test_flows_sweep_deploy import _base_study  # noqa: E402


def measure(cells: int, folder: Path) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    procs = Processes(folder)
    try:
        api_url, env = _start_server(procs, folder)
        config = _base_study(folder, f"sqlite:///{folder / 'shared' / 'mlflow.db'}")
        (folder / "shared").mkdir(exist_ok=True)
        _wait_healthy(procs, api_url)
        _run_cli(procs, "pool", ["work-pool", "create", "dpcompress", "--type", "process"], env)
        worker_env = {**env, "DPCOMPRESS_WORKDIR": str(ROOT), "DPCOMPRESS_HOME": str(folder / "shared" / "owner"),
                      "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONPATH": str(ROOT)}
        procs.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "dpcompress",
                               "--type", "process", "--name", "worker", "--limit", str(cells + 1)], worker_env)
        _run_cli(procs, "deploy", ["deploy", "--prefect-file", "flows/prefect.yaml", "--all"], env)

        alone = folder / "alone.yaml"  # the same study in a folder of its own: nothing cached for the sweep
        alone.write_text(config.read_text().replace(str(folder / "shared"), str(folder / "alone")))
        began = time.monotonic()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", str(alone), "--glue-dir", str(GLUE)], check=True,
                       env={**env, "DPCOMPRESS_HOME": str(folder / "alone" / "owner")}, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        alone_s = time.monotonic() - began

        grid = {"privacy.epsilon": [float(2 + i) for i in range(cells)]}
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("dpcompress-sweep/sweep")
            began = time.monotonic()
            run = client.create_flow_run_from_deployment(deployment.id, parameters={
                "config_path": str(config), "grid": grid, "glue_dir": str(GLUE)})
            while not (run := client.read_flow_run(run.id)).state.is_final():
                if procs.started["worker"].poll() is not None:
                    raise RuntimeError("the worker exited" + procs.logs())
                time.sleep(1)
            sweep_s = time.monotonic() - began
            if not run.state.is_completed():
                raise RuntimeError(f"sweep {run.state_name}: {run.state.message}" + procs.logs())
        with open(folder / "shared" / "tiny-sweep" / "results" / "cells.csv") as f:
            rows = [{k: (float(v) if k.endswith("_s") else v) for k, v in r.items()} for r in csv.DictReader(f)]
        for r in rows:
            r["over_cli_s"] = round(r["wall_s"] - alone_s, 1)
        return {"alone_cli_s": round(alone_s, 1), "sweep_s": round(sweep_s, 1), "cells": rows}
    finally:
        procs.stop()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep_overhead.json")
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        result = measure(args.cells, Path(tmp))
    result["meta"] = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                      "python": platform.python_version(), "load_avg_before": load, "load_avg_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
