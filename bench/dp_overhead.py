"""Benchmark: step time and peak memory of DP training (PrivateModel modes hooks, ghost, bookkeeping) against non-DP
training.
Times all modes interleaved in one process; peak RSS in fresh worker processes (see `memory_worker`). Writes JSON
under bench/results/; not a unit test. `python bench/dp_overhead.py [--quick]`."""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compression.models import build_tiny, load_classifier  # noqa: E402
from privacy.engine import PrivateModel  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
MODES = ("nondp", "hooks", "ghost", "bookkeeping")
MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"}
SIZES = {  # model name -> how to build it
    "minilm": lambda: load_classifier("all-minilm-l6-v2", num_labels=2)[0],
    "bert-base": lambda: build_tiny(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                                    intermediate_size=3072, seed=0),
    "tiny": lambda: build_tiny(seed=0),
}


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    seq_len: int
    batch_size: int
    steps: int
    warmup: int
    train_embeddings: bool = False
    hooks_memory_gb: float = 3.0  # cap on hooks' per-example gradients: larger models run in physical chunks


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def build(case: Case, seed: int = 0):
    """The model with every encoder layer and the head trainable, and a fixed random batch of full-length rows."""
    torch.manual_seed(seed)
    model = SIZES[case.model]()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.encoder.embeddings.requires_grad_(case.train_embeddings)
    vocab = model.encoder.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (case.batch_size, case.seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (case.batch_size,), generator=g)
    return model, ids, mask, labels


class Stepper:
    """One logical step of `mode` on its own model copy; frozen embeddings run once (the training loop caches them)."""

    def __init__(self, model, ids, mask, labels, *, mode: str, case: Case):
        self.model, self.mask, self.labels, self.mode = model, mask, labels, mode
        self.ids, self.types = ids, torch.zeros_like(ids)
        if not case.train_embeddings:
            with torch.no_grad():
                self.hidden = model.embed(ids, mask, self.types)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        self.private = None if mode == "nondp" else PrivateModel(
            model, self.optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=case.batch_size,
            mode=mode, generator=torch.Generator().manual_seed(0))
        per_example_bytes = 4 * sum(p.numel() for p in params)
        fit = max(1, int(case.hooks_memory_gb * 2**30 // per_example_bytes)) if mode == "hooks" else case.batch_size
        self.physical_batch = max(d for d in range(1, case.batch_size + 1) if case.batch_size % d == 0 and d <= fit)
        self.train_embeddings = case.train_embeddings

    def _logits(self, rows: slice) -> torch.Tensor:
        if self.train_embeddings:
            return self.model(self.ids[rows], self.mask[rows], self.types[rows])
        return self.model.classify(self.hidden[rows], self.mask[rows], start_layer=0)

    def step(self) -> float:
        began = time.perf_counter()
        batch = len(self.labels)
        if self.private is None:
            self.optimizer.zero_grad(set_to_none=True)
        for start in range(0, batch, self.physical_batch):
            rows = slice(start, start + self.physical_batch)
            losses = F.cross_entropy(self._logits(rows), self.labels[rows], reduction="none")
            if self.private is None:
                (losses.sum() / batch).backward()
            else:
                self.private.backward(losses)
        (self.optimizer if self.private is None else self.private).step()
        return time.perf_counter() - began


def time_case(case: Case, modes: tuple[str, ...]) -> dict[str, dict]:
    """Median step time per mode: one model copy per mode, steps interleaved across modes with the order rotated every
    round, so a load change on the shared machine hits every mode alike. A mode that fails gets its error instead."""
    base, ids, mask, labels = build(case)
    steppers, result = {}, {}
    for m in modes:
        try:
            steppers[m] = Stepper(copy.deepcopy(base), ids, mask, labels, mode=m, case=case)
        except Exception as err:
            result[m] = {"error": repr(err)}
    times: dict[str, list[float]] = {m: [] for m in steppers}
    for round_ in range(case.warmup + case.steps):
        live = [m for m in modes if m in steppers and m not in result]
        for m in live[round_ % max(1, len(live)):] + live[: round_ % max(1, len(live))]:
            try:
                seconds = steppers[m].step()
            except Exception as err:
                result[m] = {"error": repr(err)}
                continue
            if round_ >= case.warmup:
                times[m].append(seconds)
    for m, t in times.items():
        if m not in result:
            result[m] = {"median_step_s": statistics.median(t), "step_s": t,
                         "physical_batch": steppers[m].physical_batch}
    return {m: result[m] for m in modes}


def memory_worker(jobs: list[dict]) -> list[dict]:
    """Peak memory of one training step, for each (case, mode) in turn.

    The worker runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_ENV), so tensor buffers go back to the OS
    when freed and RSS tracks live tensors. After a warm-up step it resets the RSS high-water mark
    (/proc/self/clear_refs), then over one measured step: `peak_mb` = VmHWM (libraries, model, optimizer state and
    batch included) and `step_mb` = VmHWM - VmRSS just before the step (the step's own working memory). The driver
    starts one fresh worker per configuration (`--quick`: one for all, alongside the timing).
    """
    out = []
    for job in jobs:
        case, mode = Case(**job["case"]), job["mode"]
        try:
            stepper = Stepper(*build(case), mode=mode, case=case)
            stepper.step()
        except Exception as err:
            out.append({"model": case.model, "seq_len": case.seq_len, "mode": mode, "memory_error": repr(err)})
            continue
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_mb("VmRSS")
        seconds = stepper.step()
        peak = _status_mb("VmHWM")
        out.append({"model": case.model, "seq_len": case.seq_len, "mode": mode, "peak_mb": peak,
                    "step_mb": peak - base, "rss_before_step_mb": base, "worker_step_s": seconds})
        del stepper
        gc.collect()
    return out


def spawn_memory(jobs: list[dict], threads: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--memory-worker", json.dumps(jobs), "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **MALLOC_ENV})


def collect(proc: subprocess.Popen) -> list[dict]:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        return [{"error": f"memory worker exited {proc.returncode}"}]
    return json.loads(stdout.strip().splitlines()[-1])


def merge(case: Case, timing: dict[str, dict], memory: list[dict]) -> list[dict]:
    """Rows of one case: timing and memory per mode, and ratios to non-DP."""
    key = (case.model, case.seq_len)
    mem = {r["mode"]: r for r in memory if (r.get("model"), r.get("seq_len")) == key}
    rows = [{**asdict(case), "mode": mode, **t, **{k: v for k, v in mem.get(mode, {}).items()
                                                  if k not in ("model", "seq_len", "mode")}}
            for mode, t in timing.items()]
    base = next((r for r in rows if r["mode"] == "nondp"), {})
    for r in rows:
        for k, ratio in (("median_step_s", "time_ratio"), ("peak_mb", "peak_ratio"), ("step_mb", "step_ratio")):
            if k in r and k in base:
                r[ratio] = r[k] / base[k]
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':<10}{'T':>5} {'mode':<6}{'step s':>9}{'x':>7}{'peak MB':>10}{'x':>7}{'step MB':>10}{'x':>7}"
            f"{'phys':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(k, spec, r=r):
            return format(r[k], spec) if k in r else "-".rjust(int(spec.split(".")[0]))
        lines.append(f"{r['model']:<10}{r['seq_len']:>5} {r['mode']:<6}{f('median_step_s', '9.3f')}"
                     f"{f('time_ratio', '7.2f')}{f('peak_mb', '10.0f')}{f('peak_ratio', '7.2f')}"
                     f"{f('step_mb', '10.1f')}{f('step_ratio', '7.2f')}{r.get('physical_batch', '-'):>6}"
                     + (f"  error: {r['error'][:60]}" if "error" in r else ""))
    return "\n".join(lines)


def plan(args) -> list[Case]:
    if args.quick:
        return [Case(model="tiny", seq_len=16, batch_size=4, steps=2, warmup=0)]
    cases = []
    for model in args.models:
        steps = args.bert_steps if model == "bert-base" else args.steps
        cases += [Case(model=model, seq_len=t, batch_size=args.batch_size, steps=steps, warmup=1,
                       train_embeddings=args.train_embeddings, hooks_memory_gb=args.hooks_memory_gb)
                  for t in args.seq_lens]
    return cases


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, batch 4, length 16, 2 steps")
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=sorted(SIZES))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[128, 64])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode (after one warm-up)")
    p.add_argument("--bert-steps", type=int, default=2, help="measured steps per mode for bert-base")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--train-embeddings", action="store_true", help="train the embeddings too (default: frozen)")
    p.add_argument("--hooks-memory-gb", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: on a shared 2-core machine "
                   "OpenMP spin-waits made 2 threads slower and noisier than 1)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep-existing", action="store_true",
                   help="keep rows of configurations not run now from an earlier --out (e.g. rerun one model)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return []
    modes = tuple(m for m in MODES if m in args.modes)
    cases = plan(args)
    jobs = [{"case": asdict(c), "mode": m} for c in cases for m in modes]
    out = args.out or ROOT / "bench" / "results" / ("dp_overhead_quick.json" if args.quick else "dp_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
            "embeddings": "trainable" if args.train_embeddings else "frozen", "optimizer": "SGD momentum 0.9",
            "dp": "noise_multiplier 1, max_grad_norm 1, flat clipping",
            "memory_method": "VmHWM after /proc/self/clear_refs reset, glibc mmap threshold 64 KiB, "
                             + ("one worker for all (quick)" if args.quick else "fresh worker per configuration")}
    began = time.monotonic()
    shared = spawn_memory(jobs, args.threads) if args.quick else None  # quick: one worker, alongside the timing
    planned = {(c.model, c.seq_len) for c in cases}
    earlier = json.loads(out.read_text()) if args.keep_existing and out.exists() else {"rows": []}
    rows = [r for r in earlier["rows"] if (r["model"], r["seq_len"]) not in planned]
    if rows:
        meta["kept_from_earlier_run"] = {"configurations": sorted({(r["model"], r["seq_len"]) for r in rows}),
                                         "meta": earlier.get("meta")}
    timings = []
    for case in cases:
        timings.append((case, time_case(case, modes)))
        _release_memory()  # the model copies are gone; hand their pages back before the memory workers run
        print(f"timed {case.model} T={case.seq_len}: " + ", ".join(
            f"{m} {t.get('median_step_s', float('nan')):.3f}s" for m, t in timings[-1][1].items()), flush=True)
        if shared is None:  # memory right after this case's timing, so a late crash keeps earlier results
            memory = [r for m in modes for r in collect(spawn_memory([{"case": asdict(case), "mode": m}],
                                                                     args.threads))]
            rows += merge(case, timings[-1][1], memory)
            _write(out, meta, rows, began, complete=False)
    if shared is not None:
        memory = collect(shared)
        rows += [r for case, timing in timings for r in merge(case, timing, memory)]
    _write(out, meta, rows, began, complete=True)
    print(table(rows))
    print(f"wrote {out}")
    return rows


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _write(out: Path, meta: dict, rows: list[dict], began: float, *, complete: bool) -> None:
    meta = {**meta, "load_avg_after": os.getloadavg(), "seconds": time.monotonic() - began, "complete": complete}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
