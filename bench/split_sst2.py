"""Benchmark: Split-and-Privatize (compression.split) on the pretrained MiniLM-L6 and an SST-2 subset: for each split
depth k, d_chi eta and CTI on/off, split fine-tuning with LoRA (dev accuracy on the full dev split) and an inversion
attack on the private training text as sent (nearest neighbour at k=0; for k>0 the stronger of a linear inversion and
the nearest public representation, both from public CoLA/MRPC/STS-B sentences): recovery, EP = 1 - recovery, and the
EP gain against the same split without noise at the eta whose accuracy cost is <= 1 point. Writes JSON under
bench/results/; not a unit test.
`python bench/split_sst2.py [--quick] [--splits 0,2] [--etas inf,100,50] [--cti off,on] [--train 3000]`."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from compression.data import GLUE_TASKS, encode, load_split  # noqa: E402
from compression.models import DEFAULT_MODEL, build_tiny, load_classifier, resolve_model_path  # noqa: E402
from compression.split import (  # noqa: E402
    VENDOR_LORA,
    AttackConfig,
    CTIConfig,
    DXConfig,
    SplitConfig,
    VendorConfig,
    attack,
    fine_tune_split,
    public_corpus,
)

transformers.logging.set_verbosity_error()  # MiniLM's unused pooler weights are reported on every load
DATA = "/work/shared/data/glue"
MAX_COST = 0.01  # the accuracy cost (absolute, dev accuracy) at which the EP gain is read off


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random BERT (MiniLM's tokenizer), 64 "
                   "examples, one epoch, etas inf and 5")
    p.add_argument("--data-dir", default=DATA)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--splits", default="0,2", help="customer blocks k, comma-separated (0: embedding split)")
    p.add_argument("--etas", default="inf,100,50,25", help="d_chi etas, comma-separated; inf: no noise")
    p.add_argument("--cti", default="off,on", help="CTI settings to run with noise: off, on or off,on")
    p.add_argument("--train", type=int, default=3000, help="SST-2 training examples (a seeded sample)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (the head's: 1e-3)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--cti-tokens", type=int, default=500)
    p.add_argument("--cti-ratio", type=float, default=4.0)
    p.add_argument("--cti-score", default="tfidf", choices=("tfidf", "log_odds"))
    p.add_argument("--public-tasks", default="cola,mrpc,stsb")
    p.add_argument("--attack-examples", type=int, default=500, help="private training examples attacked")
    p.add_argument("--public-tokens", type=int, default=200_000, help="the learned attack's training tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def load_model(args):
    """(model, tokenizer): the pretrained classifier, or with --quick a tiny random BERT over MiniLM's tokenizer."""
    if not args.quick:
        return load_classifier(args.model, num_labels=2, pooling="mean", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    return build_tiny(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      seed=args.seed), tokenizer


def load_data(args, tokenizer) -> tuple[dict, dict, dict]:
    """Encoded (train: a seeded sample of SST-2 train, dev: all of SST-2 dev, public: the public tasks' sentences)."""
    spec = GLUE_TASKS["sst2"]
    train = load_split(spec, data_dir=args.data_dir, split="train")
    if args.train < len(train):
        train = train.select(np.sort(np.random.default_rng(args.seed).permutation(len(train))[:args.train]))
    dev = load_split(spec, data_dir=args.data_dir, split="dev")
    public = public_corpus(args.data_dir, tokenizer=tokenizer, tasks=tuple(args.public_tasks.split(",")),
                           max_length=args.max_length)
    return (encode(train, tokenizer, max_length=args.max_length), encode(dev, tokenizer, max_length=args.max_length),
            public)


def grid(args) -> list[tuple[int, float, bool]]:
    """(split, eta, cti) runs, most informative first (a grid stopped early still has a table): every split's
    no-noise baseline, then per CTI setting and eta (in the given order) every split."""
    etas = [math.inf if e.strip() == "inf" else float(e) for e in args.etas.split(",")]
    ctis = [{"off": False, "on": True}[c.strip()] for c in args.cti.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    runs = [(split, math.inf, False) for split in splits]
    return runs + [(split, eta, cti) for cti in ctis for eta in etas if not math.isinf(eta) for split in splits]


def _lora(args):
    """The registry's LoRA on the vendor's blocks (compression.split.VENDOR_LORA) at `--lora-rank`."""
    return replace(VENDOR_LORA, rank=args.lora_rank)


def run_one(model, tokenizer, data, *, split: int, eta: float, cti: bool, args) -> dict:
    """Fine-tune one configuration, attack it, and return its row (no training loss: private)."""
    train, dev, public = data
    config = SplitConfig(split_layer=split, dx=DXConfig(eta=eta), epochs=args.epochs, batch_size=args.batch_size,
                         cti=CTIConfig(enabled=cti, num_tokens=args.cti_tokens, eta_ratio=args.cti_ratio,
                                       score=args.cti_score),
                         seed=args.seed,
                         vendor=VendorConfig(method=_lora(args), learning_rate=args.lr))
    start = time.time()
    result = fine_tune_split(model, train, dev, config=config, metric="accuracy")
    train_s = time.time() - start
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    attack_config = AttackConfig(kind="auto", max_private_examples=args.attack_examples,
                                 max_public_tokens=args.public_tokens)
    inversion = attack(model, train, public, config=config, special_ids=special, attack_config=attack_config)
    return {"split_layer": split, "eta": None if math.isinf(eta) else eta, "cti": cti,
            "eta_contributing": result.metrics["eta_contributing"], "eta_other": result.metrics["eta_other"],
            "dev_accuracy": result.metrics["dev"]["accuracy"], "attack": inversion.attack,
            "recovery": inversion.recovery, "empirical_privacy": inversion.empirical_privacy,
            "attacked_tokens": inversion.num_tokens, "chance_majority": inversion.chance_majority,
            "num_steps": result.metrics["num_steps"], "guarantee": result.metrics["guarantee"],
            "train_s": round(train_s, 1), "attack_s": round(time.time() - start - train_s, 1)}


def gains(rows: list[dict]) -> list[dict]:
    """Per split and CTI setting: against the split's no-noise row, each noisy row's accuracy cost and EP gain
    (absolute; relative = gain / baseline EP, None when the baseline EP is 0), and the best row within MAX_COST."""
    out = []
    for split in sorted({r["split_layer"] for r in rows}):
        base = next((r for r in rows if r["split_layer"] == split and r["eta"] is None), None)
        if base is None:
            continue
        for cti in (False, True):
            noisy = [r for r in rows if r["split_layer"] == split and r["eta"] is not None and r["cti"] == cti]
            for r in noisy:
                r["accuracy_cost"] = base["dev_accuracy"] - r["dev_accuracy"]
                r["ep_gain_abs"] = r["empirical_privacy"] - base["empirical_privacy"]
                r["ep_gain_rel"] = r["ep_gain_abs"] / base["empirical_privacy"] if base["empirical_privacy"] else None
            within = [r for r in noisy if r["accuracy_cost"] <= MAX_COST + 1e-12]
            best = max(within, key=lambda r: r["empirical_privacy"], default=None)
            if noisy:
                out.append({"split_layer": split, "cti": cti, "baseline_accuracy": base["dev_accuracy"],
                            "baseline_ep": base["empirical_privacy"], "best_eta_within_cost": best and best["eta"],
                            "accuracy_cost": best and best["accuracy_cost"], "ep": best and best["empirical_privacy"],
                            "ep_gain_abs": best and best["ep_gain_abs"], "ep_gain_rel": best and best["ep_gain_rel"],
                            "target_met": bool(best and best["ep_gain_rel"] is not None and best["ep_gain_rel"]
                                               >= 0.62)})
    return out


def settings(args, data) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench", "compression", "privacy", ":!bench/results"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()  # results are outputs, not code
    return {"model": "build_tiny(hidden 32, 2 layers) over MiniLM's tokenizer" if args.quick else args.model,
            **{k: v for k, v in vars(args).items() if k not in ("out", "quick", "model")},
            "quick": args.quick, "train_examples": len(data[0]["input_ids"]),
            "dev_examples": len(data[1]["input_ids"]), "public_sentences": len(data[2]["input_ids"]),
            "max_accuracy_cost": MAX_COST, "vendor": asdict(_lora(args)),
            "attacked_text": "the first --attack-examples private training examples, privatized as the customer "
                             "sends them (fresh noise)", "commit": commit.stdout.strip() or None,
            "uncommitted_changes": bool(dirty),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.etas, args.attack_examples, args.public_tokens = 64, 1, "inf,5", 16, 2000
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    data = load_data(args, tokenizer)
    out = args.out or ROOT / "bench" / "results" / ("split_sst2_quick.json" if args.quick else "split_sst2.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for split, eta, cti in grid(args):
        rows.append(run_one(model, tokenizer, data, split=split, eta=eta, cti=cti, args=args))
        print(json.dumps(rows[-1]), flush=True)
        result = {"settings": settings(args, data), "rows": rows, "gains": gains(rows),
                  "wall_s": round(time.time() - start, 1)}
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every run: a long grid can be read while it runs
    print(json.dumps(result["gains"], indent=2))


if __name__ == "__main__":
    main()
