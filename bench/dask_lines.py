"""Benchmark: a study's independent lines on a local Dask cluster against the sequential run (issue 16). Not a unit
test; writes JSON under bench/results/. `python bench/dask_lines.py [--config flows/configs/paper.yaml]
[--set KEY=VALUE ...] [--workers 2] [--out FILE]`.

The same study (`privacy.scope: line`) runs twice with `dpcompress run`, one after the other, each in a fresh output
folder with its own dataset ledger (nothing cached between them): sequentially in the flow's process (torch on every
core), then with `execution.local_workers: N` (N single-thread worker processes). Recorded per run: the command's
wall time, each stage's running time (its MLflow run, server clock) and each line's (the sum of its stages), and the
dev metric of every model. Without a secret-noise test mode the two runs draw different noise, so their metrics
agree only up to DP noise.

The estimate for a machine with more cores: the Dask run's wall time with its lines' single-thread times rescheduled
longest first on W workers instead of N; the rest (start-up, the stages before the lines, which stay sequential, the
cluster's start) kept as measured. At W = the number of lines the lines take as long as the longest one.
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
sys.path[:0] = [str(ROOT)]

GLUE = ROOT.parent / "shared" / "data" / "glue"


def _config(config: Path, overrides: list[str], folder: Path, workers: int | None, glue: Path) -> Path:
    import yaml

    from flows.config_file import read_config

    raw = read_config(config, overrides, glue_dir=str(glue))
    raw["output_dir"] = str(folder)
    raw.setdefault("privacy", {})["dataset_ledger"] = str(folder / "ledger.db")
    raw["tracking"] = {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "bench"}
    if workers:
        raw["execution"] = {"local_workers": workers}
    else:
        raw.pop("execution", None)
    path = folder.with_suffix(".yaml")
    folder.mkdir(parents=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _stage_seconds(folder: Path) -> dict[str, float]:
    """Each stage's running time: its MLflow run's end minus start (the study's parent run left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
    return {r.data.tags["dpcompress.stage"]: round((r.info.end_time - r.info.start_time) / 1000, 1)
            for r in runs if "dpcompress.stage" in r.data.tags and r.info.end_time}


def _metrics(folder: Path) -> dict[str, float]:
    study = next(p for p in folder.iterdir() if (p / "results" / "results.csv").exists())
    with open(study / "results" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    metric = next(k for k in rows[0] if k not in ("stage", "line"))
    return {r["stage"]: round(float(r[metric]), 4) for r in rows}


def run_once(config: Path, overrides: list[str], folder: Path, workers: int | None, glue: Path) -> dict:
    path = _config(config, overrides, folder, workers, glue)
    label = f"{workers} Dask workers" if workers else "sequential"
    print(f"[bench] {label}: dpcompress run {path} (log {folder}.log)", flush=True)
    env = {**os.environ, "DPCOMPRESS_HOME": str(folder / "owner")}
    began = time.monotonic()
    with open(f"{folder}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    wall = round(time.monotonic() - began, 1)
    if code:
        raise SystemExit(f"[bench] {label}: dpcompress run exited with {code}; see {folder}.log")
    print(f"[bench] {label}: {wall} s", flush=True)
    return {"wall_s": wall, "stage_s": _stage_seconds(folder), "metric": _metrics(folder)}


def line_seconds(lines: dict[str, list[str]], stage_s: dict[str, float]) -> dict[str, float]:
    return {name: round(sum(stage_s.get(s, 0.0) for s in stages), 1) for name, stages in lines.items()}


def schedule_s(durations: list[float], workers: int) -> float:
    """Longest-first list scheduling of `durations` on `workers`: when the busiest worker finishes."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "flows" / "configs" / "paper.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--glue-dir", type=Path, default=GLUE)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dask_lines.json")
    p.add_argument("--keep", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    args = p.parse_args(argv)

    from flows.config import load_config
    from flows.plan import model_lines

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dask-lines-") as tmp:
        base = args.keep or Path(tmp)
        sequential = run_once(args.config, args.overrides, base / "sequential", None, args.glue_dir)
        dask = run_once(args.config, args.overrides, base / "dask", args.workers, args.glue_dir)
        cfg = load_config(base / "sequential.yaml")
    lines = {name: [s.name for s in stages] for name, stages in model_lines(cfg).items()}
    for result in (sequential, dask):
        result["line_s"] = line_seconds(lines, result["stage_s"])
        in_lines = {s for stages in lines.values() for s in stages}
        result["before_lines_s"] = round(sum(t for s, t in result["stage_s"].items() if s not in in_lines), 1)
    # the Dask run with its lines (single-thread times) rescheduled on W workers; the rest of its wall time (start-up,
    # the stages before the lines, the Dask cluster) kept as measured
    one_thread = list(dask["line_s"].values())
    fixed = dask["wall_s"] - schedule_s(one_thread, args.workers)
    estimate = {str(w): round(fixed + schedule_s(one_thread, w), 1) for w in (1, 2, 4, 8, len(one_thread))}
    result = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "overrides": args.overrides, "workers": args.workers, "lines": lines,
        "sequential": sequential, "dask": dask,
        "speedup": round(sequential["wall_s"] / dask["wall_s"], 3),
        "estimate_wall_s_by_workers": estimate,
        "estimate_note": "the Dask run's wall time with its single-thread line times rescheduled longest first on W "
                         "workers (the rest kept as measured); assumes a core and the memory for each worker",
        "meta": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                 "python": platform.python_version(), "load_avg_before": load, "load_avg_after": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
