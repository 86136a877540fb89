"""Benchmark: CPU inference latency (median ms per batch) and throughput (sequences/s) of a teacher and its students at
batch 1 and 32, sequence length 64, timed interleaved in one process. Writes JSON under bench/results/; not a unit test.
`python bench/inference.py [--quick] [--model NAME=PATH ...]` (the first model is the reference for speedups)."""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from compression.distill import every_other_layer  # noqa: E402
from compression.models import build_tiny, count_parameters, load_classifier, load_saved  # noqa: E402

transformers.logging.set_verbosity_error()  # MiniLM's unused pooler weights are reported on every load
transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class Entry:
    name: str
    forward: Callable  # (input_ids, attention_mask, token_type_ids) -> logits
    parameters: int
    vocab_size: int
    source: str


def from_module(name: str, model, source: str) -> Entry:
    model.eval()
    return Entry(name, model, count_parameters(model), model.encoder.config.vocab_size, source)


def load_entry(name: str, path: str) -> Entry:
    """A folder written by `save_classifier` (classifier.json) or by `export_hf` (custom-code HF folder)."""
    folder = Path(path)
    if (folder / "classifier.json").exists():
        return from_module(name, load_saved(folder)[0], str(folder))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--model {name}={path}: neither classifier.json nor config.json found")
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()

    def forward(ids, mask, types):
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    return Entry(name, forward, count_parameters(model), model.get_input_embeddings().num_embeddings, str(folder))


def structured_half(teacher) -> tuple[object | None, str | None]:
    """Every layer kept with half its heads and half its FFN units (one magnitude round of
    `compression.pruning.structured`), if that module exists with `StructuredConfig` and `structured_round`. Else
    (None, reason)."""
    if importlib.util.find_spec("compression.pruning.structured") is None:
        return None, "compression.pruning.structured not present"
    module = importlib.import_module("compression.pruning.structured")
    if not all(hasattr(module, n) for n in ("StructuredConfig", "structured_round")):
        return None, "compression.pruning.structured lacks StructuredConfig / structured_round"
    student = copy.deepcopy(teacher)
    try:
        config = module.StructuredConfig(target_layers=1.0, target_heads=0.5, target_ffn=0.5, rounds=1)
        module.structured_round(student, config, 1)
    except Exception as err:
        return None, f"structured_round failed: {err!r}"
    return student, None


def default_entries(quick: bool) -> tuple[list[Entry], dict[str, str]]:
    """Teacher (bundled MiniLM; --quick: a tiny BERT), its every-other-layer student, and a structured half model."""
    teacher = build_tiny(num_layers=4, dropout=0.0, seed=0) if quick else load_classifier(
        "all-minilm-l6-v2", num_labels=2)[0]
    source = "build_tiny(num_layers=4)" if quick else "all-minilm-l6-v2"
    entries = [from_module("teacher", teacher, source),
               from_module("every_other", every_other_layer(teacher), "every_other_layer(teacher)")]
    half, reason = structured_half(teacher)
    if half is not None:
        entries.append(from_module("structured_half", half, "structured_round: half heads, half FFN"))
    return entries, ({"structured_half": reason} if reason else {})


@torch.inference_mode()
def time_entries(entries: list[Entry], *, batch_sizes: list[int], seq_len: int, repeats: int, warmup: int,
                 seed: int = 0) -> dict[tuple[str, int], list[float]]:
    """Seconds per forward of every (model, batch size), interleaved: each repeat runs every case once, the order
    rotated every repeat, so a load change on the shared machine hits every model alike."""
    vocab = min(e.vocab_size for e in entries)
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for b in batch_sizes:
        ids = torch.randint(min(1000, vocab // 2), vocab, (b, seq_len), generator=g)
        inputs[b] = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    cases = [(e, b) for b in batch_sizes for e in entries]
    times: dict[tuple[str, int], list[float]] = {(e.name, b): [] for e, b in cases}
    for round_ in range(warmup + repeats):
        shift = round_ % len(cases)
        for entry, b in cases[shift:] + cases[:shift]:
            began = time.perf_counter()
            entry.forward(*inputs[b])
            seconds = time.perf_counter() - began
            if round_ >= warmup:
                times[(entry.name, b)].append(seconds)
    return times


def rows_of(entries: list[Entry], times: dict, *, seq_len: int) -> list[dict]:
    """One row per (model, batch size) with median ms, throughput, and ratios to the first model (the reference)."""
    rows = []
    for (name, b), t in times.items():
        entry = next(e for e in entries if e.name == name)
        median = statistics.median(t)
        rows.append({"model": name, "source": entry.source, "batch_size": b, "seq_len": seq_len,
                     "parameters": entry.parameters, "median_ms": 1000 * median,
                     "throughput_seq_s": b / median, "ms": [1000 * s for s in t]})
    reference = entries[0].name
    for r in rows:
        base = next(x for x in rows if x["model"] == reference and x["batch_size"] == r["batch_size"])
        r["speedup"] = base["median_ms"] / r["median_ms"]
        r["parameter_ratio"] = r["parameters"] / base["parameters"]
    return sorted(rows, key=lambda r: (r["batch_size"], [e.name for e in entries].index(r["model"])))


def table(rows: list[dict]) -> str:
    head = f"{'model':<18}{'batch':>6}{'params M':>10}{'x':>7}{'median ms':>11}{'seq/s':>9}{'speedup':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18}{r['batch_size']:>6}{r['parameters'] / 1e6:>10.2f}{r['parameter_ratio']:>7.2f}"
                     f"{r['median_ms']:>11.2f}{r['throughput_seq_s']:>9.1f}{r['speedup']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models (unless --model), 3 repeats")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a folder from save_classifier or export_hf (repeatable; the first is the reference)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per case (default 15; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards per case (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: the machine is shared)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.model:
        bad = [m for m in args.model if "=" not in m]
        if bad:
            p.error(f"--model takes NAME=PATH, got {bad}")
        entries, skipped = [load_entry(*m.split("=", 1)) for m in args.model], {}
    else:
        entries, skipped = default_entries(args.quick)
    out = args.out or ROOT / "bench" / "results" / ("inference_quick.json" if args.quick else "inference.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "seq_len": args.seq_len, "repeats": repeats,
            "warmup": warmup, "reference": entries[0].name, "skipped": skipped,
            "inputs": "random ids, full-length rows (no padding), one segment; torch.inference_mode, eval"}
    began = time.monotonic()
    times = time_entries(entries, batch_sizes=args.batch_sizes, seq_len=args.seq_len, repeats=repeats,
                         warmup=warmup)
    rows = rows_of(entries, times, seq_len=args.seq_len)
    meta.update(load_avg_after=os.getloadavg(), seconds=time.monotonic() - began)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(table(rows))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
