"""Evaluation of a classifier on a public dev split: GLUE metric, sparsity, parameters, size; and a CPU latency probe
(bench/inference.py measures latency side by side, interleaved and repeated: a study's stages run one after another
on a shared machine, so per-stage timings would not be comparable).

Runs on dev data only (never on private training data). Pure library.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from compression.data import padded_batches
from compression.models import TextClassifier, count_parameters


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    denom = float((pred == 1).sum() + (gold == 1).sum())
    return 2 * tp / denom if denom else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    tp, tn = float(((pred == 1) & (gold == 1)).sum()), float(((pred == 0) & (gold == 0)).sum())
    fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def glue_metrics(metric: str, logits: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The task's GLUE metric(s) plus accuracy for classification. `metric` names the main one."""
    if metric == "pearson_spearman":
        pred = logits.reshape(-1)
        pearson, spearman = stats.pearsonr(pred, gold)[0], stats.spearmanr(pred, gold)[0]
        return {"pearson": float(pearson), "spearman": float(spearman),
                "pearson_spearman": float((pearson + spearman) / 2)}
    pred = logits.argmax(-1)
    out = {"accuracy": accuracy(pred, gold)}
    if metric == "f1":
        out["f1"] = f1(pred, gold)
    elif metric == "matthews":
        out["matthews"] = matthews(pred, gold)
    elif metric != "accuracy":
        raise ValueError(f"unknown metric {metric!r}")
    return out


@torch.no_grad()
def predict(model: TextClassifier, data: dict, *, batch_size: int = 64) -> np.ndarray:
    """Logits for every example, in input order; batches are grouped by length to cut padding."""
    out = torch.empty(len(data["input_ids"]), model.num_labels)
    model.eval()
    for chunk, input_ids, mask, token_types in padded_batches(data, batch_size):
        out[chunk] = model(input_ids, mask, token_types).float()
    return out.numpy()


def sparsity(model: torch.nn.Module, names: list[str] | None = None) -> float:
    """Fraction of exactly-zero entries over the named parameters (default: the 2-D weights of the transformer
    layers, `model.family.layer_prefix`)."""
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if n.startswith(model.family.layer_prefix) and p.dim() == 2]
    total = sum(params[n].numel() for n in names)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def size_on_disk(directory: str | Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


@torch.no_grad()
def cpu_latency(model: TextClassifier, *, batch_size: int, seq_len: int = 64, repeats: int = 5) -> float:
    """Median seconds per forward pass of a `[batch_size, seq_len]` batch on this machine's CPU."""
    model.eval()
    ids = torch.randint(1000, 2000, (batch_size, seq_len))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    model(ids, mask, types)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model(ids, mask, types)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def evaluate(model: TextClassifier, dev: dict, *, metric: str, directory: str | Path | None = None) -> dict:
    """Every number the study table reports for one model (no latency: see the module doc)."""
    gold = torch.as_tensor(dev["labels"]).numpy()
    results = glue_metrics(metric, predict(model, dev), gold)
    results["metric"] = results[metric]
    results.update(sparsity=sparsity(model), parameters=count_parameters(model),
                   nonzero_parameters=count_parameters(model, nonzero=True))
    if directory is not None:
        results["size_bytes"] = size_on_disk(directory)
    return results
