"""Benchmark: peak training memory and step time of every registered fine-tuning method (compression.methods), DP
and non-DP, side by side in one run, as ratios to DP full fine-tuning. Not a unit test; writes JSON under
bench/results/. `python bench/memory.py [--quick] [--models minilm bert-base] [--device cpu|cuda]`.

Memory: CPU, the peak RSS of a fresh worker process per configuration (VmHWM reset after a warm-up step, glibc's
mmap threshold fixed so freed tensors go back to the OS), and the job's own part of it (`job_peak_mb`: that peak less
the worker's RSS before it built a model, i.e. without the interpreter and libraries, as a GPU's allocator counts);
GPU when used, torch.cuda.max_memory_allocated over the measured steps (reset after the warm-up). Step time: median
of the measured steps in that worker.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.dp_overhead import SIZES  # noqa: E402
from compression.methods import METHODS, get_method  # noqa: E402
from compression.profile import MALLOC_ENV, Stepper, measure, status_mb  # noqa: E402

# every layer adapted, whatever the method's own default (a method not named here runs with its config's defaults,
# `layers: all` when it has that field): the registry decides which methods run. `side` has no layers: its side
# network follows every backbone layer by default (reduction 8)
METHOD_SETTINGS = {"full": {"layers": "all"}, "bitfit": {"layers": "all"}, "bias_norm": {"layers": "all"},
                   "lora": {"layers": "all"}, "side": {}, "reversible": {"layers": "all"}}
BASELINE = ("full", True)  # ratios are to DP full fine-tuning


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    seq_len: int
    batch_size: int
    steps: int
    warmup: int
    optimizer: str = "sgd"
    engine: str = "bookkeeping"
    device: str = "cpu"


def method_config(name: str):
    """The benchmarked config of method `name`: METHOD_SETTINGS over the config's defaults."""
    cls = get_method(name).config
    settings = METHOD_SETTINGS.get(name, {"layers": "all"} if "layers" in cls.__dataclass_fields__ else {})
    return cls(**settings)


def measure_job(job: dict) -> dict:
    """Memory and step times of one configuration in this process (`job`: case, method, dp): compression.profile's
    Stepper and measure, on this benchmark's model sizes."""
    case, method, dp = Case(**job["case"]), job["method"], job["dp"]
    row = {"model": case.model, "seq_len": case.seq_len, "method": method, "dp": dp}
    libraries = status_mb("VmRSS")  # interpreter and libraries, before any model exists
    try:
        stepper = Stepper(SIZES[case.model](), method_config(method), batch_size=case.batch_size,
                          seq_len=case.seq_len, dp=dp, optimizer=case.optimizer, engine=case.engine,
                          device=case.device)
        row.update(measure(stepper, steps=case.steps, warmup=case.warmup))
        # the job's own peak (model, optimizer state, cached features, activations; what a GPU's allocator counts),
        # without the interpreter and libraries every configuration carries alike
        row.update(libraries_mb=libraries, job_peak_mb=row["peak_mb"] - libraries)
    except Exception as err:  # a configuration that cannot run (e.g. out of memory) is a result, not a crash
        return {**row, "error": repr(err)}
    row["cached_features"] = list(stepper.features.shape[2:])
    return row


def worker(jobs: list[dict]) -> list[dict]:
    return [measure_job(job) for job in jobs]


def run_worker(jobs: list[dict], threads: int) -> list[dict]:
    """`jobs` in a fresh process (its peak RSS is theirs alone when there is one job)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(jobs), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return [{**_key(j), "error": f"worker exited {proc.returncode}: {tail[0][:200]}"} for j in jobs]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _key(job: dict) -> dict:
    return {"model": job["case"]["model"], "seq_len": job["case"]["seq_len"], "method": job["method"],
            "dp": job["dp"]}


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's memory and time as ratios to DP full fine-tuning on the same model and length. A baseline value
    that is not positive has no ratio: with --quick every configuration shares one process, and the baseline's own
    job memory can round to nothing (or below) once earlier configurations have grown the heap."""
    for r in rows:
        base = next((b for b in rows if (b["model"], b["seq_len"], b["method"], b["dp"]) ==
                     (r["model"], r["seq_len"], *BASELINE)), {})
        for k in ("peak_mb", "job_peak_mb", "step_mb", "cuda_peak_mb", "median_step_s"):
            if k in r and base.get(k, 0) > 0:
                r[f"{k}_ratio"] = r[k] / base[k]
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':<10}{'T':>5} {'method':<11}{'dp':<4}{'trainable':>11}{'step s':>9}{'x':>6}{'peak MB':>9}"
            f"{'x':>6}{'job MB':>9}{'x':>6}{'step MB':>9}{'x':>6}{'cuda MB':>9}{'x':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(k, spec, r=r):
            return format(r[k], spec) if k in r else "-".rjust(int(spec.split(".")[0]))
        lines.append(f"{r['model']:<10}{r['seq_len']:>5} {r['method']:<11}{'y' if r['dp'] else 'n':<4}"
                     f"{f('trainable_parameters', '11d')}{f('median_step_s', '9.3f')}{f('median_step_s_ratio', '6.2f')}"
                     f"{f('peak_mb', '9.0f')}{f('peak_mb_ratio', '6.2f')}"
                     f"{f('job_peak_mb', '9.0f')}{f('job_peak_mb_ratio', '6.2f')}{f('step_mb', '9.0f')}"
                     f"{f('step_mb_ratio', '6.2f')}{f('cuda_peak_mb', '9.0f')}{f('cuda_peak_mb_ratio', '6.2f')}"
                     + (f"  error: {r['error'][:60]}" if "error" in r else ""))
    return "\n".join(lines)


def plan(args) -> list[dict]:
    """One job per (model, method, DP or not)."""
    methods = args.methods or sorted(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; registered: {sorted(METHODS)}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    cases = [Case(model=m, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, warmup=1,
                  optimizer=args.optimizer, engine=args.engine, device=device) for m in args.models]
    return [{"case": asdict(c), "method": m, "dp": dp} for c in cases for m in methods for dp in (True, False)]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, batch 4, length 16, 2 steps, "
                   "every configuration in this process (its memory is then not per configuration)")
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--engine", default="bookkeeping", choices=["bookkeeping", "ghost", "hooks"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    if args.quick:
        args.models, args.seq_len, args.batch_size, args.steps = ["tiny"], 16, 4, 2
    jobs = plan(args)
    out = args.out or ROOT / "bench" / "results" / ("memory_quick.json" if args.quick else "memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "device": jobs[0]["case"]["device"],
            "settings": {m: str(method_config(m)) for m in dict.fromkeys(j["method"] for j in jobs)},
            "dp": f"{args.engine}, noise_multiplier 1, max_grad_norm 1, flat clipping", "embeddings": "frozen",
            "memory_method": "VmHWM after /proc/self/clear_refs reset, glibc mmap threshold 64 KiB, "
                             + ("this process for all (quick)" if args.quick else "fresh worker per configuration")}
    began = time.monotonic()
    rows = worker(jobs) if args.quick else []  # quick: in this process (one import of torch and transformers)
    for job in [] if args.quick else jobs:
        rows += run_worker([job], args.threads)
        print(f"measured {job['case']['model']} {job['method']} dp={job['dp']}", flush=True)
        _write(out, meta, add_ratios(rows), began, complete=False)  # a late crash keeps the earlier rows
    _write(out, meta, add_ratios(rows), began, complete=True)
    print(table(rows))
    print(f"wrote {out}")
    return rows


def _write(out: Path, meta: dict, rows: list[dict], began: float, *, complete: bool) -> None:
    meta = {**meta, "load_avg_after": os.getloadavg(), "seconds": time.monotonic() - began, "complete": complete}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
