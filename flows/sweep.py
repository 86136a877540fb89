"""The sweep flow: a base study config and a grid of config keys -> one flow run of the `study` deployment per cell
(workers of its pool, on any machines, run cells side by side) -> a privacy-utility table and plots across cells
under the sweep's MLflow run. Every cell is a study of its own (its own folder, cache and ledger entries): a rerun of
a finished sweep is a cache hit in every cell. Not here: running a study (flows/study.py)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

from prefect import flow

from flows.config import ConfigError, StudyConfig, load_config
from tasks.sweep import Cell, open_sweep, start_cell, sweep_table, wait_for_cells

STUDY_DEPLOYMENT = "dpcompress-study/study"


@flow(name="dpcompress-sweep", log_prints=True, persist_result=False)
def sweep(config_path: str, grid: dict[str, list[Any]], overrides: list[str] | None = None,
          glue_dir: str | None = None, name: str | None = None,
          study_deployment: str = STUDY_DEPLOYMENT) -> list[dict]:
    """Run every cell of `grid` over the study in `config_path` as a flow run of the study deployment, then the
    sweep's table; returns one row per model of every cell.

    Args:
        config_path: The base study's YAML config, absolute or relative to the working directory (on a worker,
            $DPCOMPRESS_WORKDIR), e.g. flows/configs/quickstart.yaml.
        grid: Config key -> the values it takes, e.g. {"privacy.epsilon": [1, 4, 8]}; every combination is a cell.
        overrides: Config keys set in every cell, each KEY=VALUE like `dpcompress run --set`.
        glue_dir: Local GLUE folder for configs without data.dir; default $DPCOMPRESS_GLUE_DIR, else the HF hub.
        name: The sweep's name (its results folder and MLflow run); default "<study name>-sweep".
        study_deployment: The deployment that runs one study ("flow name/deployment name").
    """
    base = load_config(config_path, overrides or [], glue_dir=glue_dir)
    sweep_name = name or f"{base.name}-sweep"
    folder = Path(base.output_dir).resolve() / sweep_name
    uri = base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    cells = plan_cells(config_path, grid, overrides or [], base_name=base.name, glue_dir=glue_dir, tracking_uri=uri)
    uri = uri or f"sqlite:///{folder / 'mlflow.db'}"  # no shared store named: the sweep's own, cells keep theirs
    parent = open_sweep(tracking_uri=uri, experiment=base.tracking.experiment, name=sweep_name,
                        sweep_key=sweep_key(base, grid),
                        config={"base": base.model_dump(mode="json"), "grid": grid})
    started = [start_cell(cell=cell, deployment=study_deployment) for cell in cells]
    runs = wait_for_cells(started=started)
    rows = sweep_table(cells=cells, runs=runs, tracking_uri=uri, parent_run_id=parent, output_dir=str(folder))
    if failed := [f"{c.study} ({r.state}: {r.message})" for c, r in zip(cells, runs) if r.state != "COMPLETED"]:
        raise RuntimeError(f"{len(failed)} of {len(cells)} cells did not complete: {'; '.join(failed)}")
    return rows


def plan_cells(config_path: str, grid: dict[str, list], overrides: list[str], *, base_name: str,
               glue_dir: str | None, tracking_uri: str | None) -> list[Cell]:
    """Every cell of `grid`, each a validated study config: ConfigError naming every bad key or value, before any
    flow run is created. A cell's study is named after the base study and its values, so a rerun finds its folder."""
    problems = [f"grid: {key!r}: the sweep names its cells (remove it from the grid)" for key in grid if key == "name"]
    problems += [f"grid: {key!r}: expected a non-empty list of values, got {values!r}" for key, values in grid.items()
                 if not isinstance(values, list) or not values]
    if problems or not grid:
        raise ConfigError(problems or ["grid: empty; give at least one key and its values"])
    cells = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        sets = [*overrides, *(f"{key}={json.dumps(value)}" for key, value in values.items()),
                f"name={cell_name(base_name, values)}"]
        sets += [f"tracking.uri={tracking_uri}"] if tracking_uri else []  # one store for the sweep and its cells
        try:
            cfg = load_config(config_path, sets, glue_dir=glue_dir)
        except ConfigError as err:
            raise ConfigError([f"grid cell {values}: {line}" for line in err.problems]) from None
        cells.append(Cell(values=values, study=cfg.name, study_dir=str(cfg.study_dir),
                          parameters={"config_path": config_path, "overrides": sets, "glue_dir": glue_dir}))
    return cells


def cell_name(base: str, values: dict) -> str:
    """"<base>-<last key part><value>_..." (file-name safe, at most ~80 characters) and a digest of the values, which
    keeps two cells apart whatever the text drops."""
    text = "_".join(f"{key.rsplit('.', 1)[-1]}{json.dumps(value)}" for key, value in values.items())
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:64]
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:6]
    return f"{base}-{readable}-{digest}"


def sweep_key(base: StudyConfig, grid: dict) -> str:
    """The sweep's identity: its base study and grid (its MLflow run is reused when the same sweep reruns)."""
    payload = json.dumps({"base": base.model_dump(mode="json"), "grid": grid}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
