"""Benchmark: a study's independent lines on a local Dask cluster against the sequential run (issue 16). Not a unit
test; writes JSON under bench/results/. `python bench/dask_lines.py [--config flows/configs/paper.yaml]
[--set KEY=VALUE ...] [--workers 2] [--threads 1] [--out FILE]`.

The same study (`privacy.scope: line`) runs twice with `dpcompress run`, one after the other, each in a fresh output
folder with its own dataset ledger and tracking store (nothing cached between them): sequentially in the flow's
process (torch on every core), then with `execution.local_workers: N` (N worker processes of `--threads` torch
threads). Recorded per run: the command's wall time; each line's wall time, start and process, as the flow wrote them
(STUDY/timings/lines.json: the whole line, its public preparation included); the span from the first line's start to
the last line's end, and the rest of the wall time outside it (start-up, data, the DP and non-private teachers, the
evaluations and the registry); the dev metric of every model. Unless the config sets the seeded-noise test mode
(`privacy.reproducible_noise`), the two runs draw different noise, so their metrics agree only up to DP noise.

The estimate for a machine with more cores: the Dask run's time outside the lines, plus its lines' times (at the
workers' threads) scheduled longest first on W workers (Dask hands lines out in submission order, which can do worse).
It assumes the cores and the memory for every worker.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def default_glue() -> Path | None:
    """$DPCOMPRESS_GLUE_DIR, else the developers' ../shared/data/glue when it is there, else None (the HF hub)."""
    if os.environ.get("DPCOMPRESS_GLUE_DIR"):
        return Path(os.environ["DPCOMPRESS_GLUE_DIR"])
    shared = ROOT.parent / "shared" / "data" / "glue"
    return shared if shared.is_dir() else None


def _config(config: Path, overrides: list[str], folder: Path, workers: int | None, glue: Path | None,
            threads: int = 1) -> Path:
    import yaml

    from flows.config_file import read_config

    if folder.exists():
        raise SystemExit(f"[bench] {folder} exists: give --keep a new folder (nothing there is overwritten)")
    raw = read_config(config, overrides, glue_dir=str(glue) if glue else None)
    raw["output_dir"] = str(folder)
    raw.setdefault("privacy", {})["dataset_ledger"] = str(folder / "ledger.db")
    raw["tracking"] = {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "bench"}
    if workers:
        raw["execution"] = {"local_workers": workers, "threads_per_worker": threads}
    else:
        raw.pop("execution", None)
    folder.mkdir(parents=True)
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _metrics(study: Path) -> dict[str, float]:
    with open(study / "results" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    metric = next(k for k in rows[0] if k not in ("stage", "line"))
    return {r["stage"]: round(float(r[metric]), 4) for r in rows}


def run_once(config: Path, overrides: list[str], folder: Path, workers: int | None, glue: Path | None,
             threads: int = 1) -> dict:
    from flows.config import load_config

    path = _config(config, overrides, folder, workers, glue, threads)
    study = folder / load_config(path).name
    label = f"{workers} Dask workers" if workers else "sequential"
    print(f"[bench] {label}: dpcompress run {path} (log {folder}.log)", flush=True)
    env = {**os.environ, "DPCOMPRESS_HOME": str(folder / "owner"), "HF_HUB_OFFLINE": os.environ.get(
        "HF_HUB_OFFLINE", "1")}
    began = time.monotonic()
    with open(f"{folder}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    wall = round(time.monotonic() - began, 1)
    if code:
        raise SystemExit(f"[bench] {label}: dpcompress run exited with {code}; see {folder}.log")
    print(f"[bench] {label}: {wall} s", flush=True)
    times = json.loads((study / "timings" / "lines.json").read_text())
    span = max(t["began"] + t["seconds"] for t in times.values()) - min(t["began"] for t in times.values())
    return {"wall_s": wall, "line_s": {name: round(t["seconds"], 1) for name, t in times.items()},
            "line_process": {name: t["process"] for name, t in times.items()},
            "line_threads": {name: t.get("threads") for name, t in times.items()},
            "lines_span_s": round(span, 1), "outside_lines_s": round(wall - span, 1), "metric": _metrics(study)}


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
    p.add_argument("--threads", type=int, default=1, help="torch threads per Dask worker")
    p.add_argument("--glue-dir", type=Path, default=default_glue())
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dask_lines.json")
    p.add_argument("--keep", type=Path, help="keep the runs' folders here (a new folder; default: a temporary one)")
    args = p.parse_args(argv)
    config, out = args.config.resolve(), args.out.resolve()

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dask-lines-") as tmp:
        base = args.keep.resolve() if args.keep else Path(tmp)
        glue = args.glue_dir.resolve() if args.glue_dir else None
        sequential = run_once(config, args.overrides, base / "sequential", None, glue)
        dask = run_once(config, args.overrides, base / "dask", args.workers, glue, args.threads)
    worker_lines = list(dask["line_s"].values())
    estimate = {str(w): round(dask["outside_lines_s"] + schedule_s(worker_lines, w), 1)
                for w in sorted({1, 2, 4, 8, len(worker_lines)})}
    result = {
        "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
        "overrides": args.overrides, "workers": args.workers, "threads_per_worker": args.threads,
        "sequential": sequential, "dask": dask,
        "speedup": round(sequential["wall_s"] / dask["wall_s"], 3),
        "lines_speedup": round(sequential["lines_span_s"] / dask["lines_span_s"], 3),
        "sequential_line_sum_s": round(sum(sequential["line_s"].values()), 1),
        "dask_worker_line_sum_s": round(sum(worker_lines), 1),
        "estimate_wall_s_by_workers": estimate,
        "estimate_note": "the Dask run's time outside its lines + its line times (at threads_per_worker) scheduled "
                         "longest first on W workers; assumes the cores and the memory for every worker",
        "meta": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                 "python": platform.python_version(), "load_avg_before": load, "load_avg_after": os.getloadavg()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
