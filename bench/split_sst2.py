"""Benchmark: split fine-tuning (compression.split) of a tiny randomly initialised BERT on an SST-2 subset, at the
embedding split, for several d_chi etas with and without CTI: dev accuracy and the nearest-neighbour attack's
recovery on the training text, EP = 1 - recovery. No pretrained weights (offline): the word-level vocabulary is
built from the training texts, so absolute accuracies are far below MiniLM's. Writes JSON under bench/results/;
not a unit test. `python bench/split_sst2.py [--quick]`."""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from compression.data import GLUE_TASKS, encode, load_split  # noqa: E402
from compression.methods.full import FullConfig  # noqa: E402
from compression.models import build_tiny  # noqa: E402
from compression.split import (  # noqa: E402
    AttackConfig,
    CTIConfig,
    DXConfig,
    SplitConfig,
    VendorConfig,
    attack,
    fine_tune_split,
    public_corpus,
)

DATA = "/work/shared/data/glue"


def word_tokenizer(texts, size: int) -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is the `size` most frequent lower-cased words of `texts`."""
    counts = collections.Counter(w for t in texts for w in t.lower().split())
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in counts.most_common(size)]
    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train", type=int, default=8000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = GLUE_TASKS["sst2"]
    train_split = load_split(spec, data_dir=DATA, split="train")
    count = 1000 if args.quick else args.train
    train_split = train_split.select(list(range(count)))
    dev_split = load_split(spec, data_dir=DATA, split="dev")
    tokenizer = word_tokenizer(train_split.texts[0], 3000)
    train, dev = (encode(s, tokenizer, max_length=48) for s in (train_split, dev_split))
    public = public_corpus(DATA, tokenizer=tokenizer, tasks=("cola",), max_length=48)
    model = build_tiny(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                       dropout=0.1, seed=0)
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    base = SplitConfig(split_layer=0, epochs=2 if args.quick else 3, batch_size=32,
                       vendor=VendorConfig(method=FullConfig(layers="all"), learning_rate=1e-3))
    rows = []
    for eta, cti in [(math.inf, False), (10.0, False), (5.0, False), (2.0, False), (5.0, True), (2.0, True)]:
        config = replace(base, dx=DXConfig(eta=eta), cti=CTIConfig(enabled=cti, num_tokens=300))
        start = time.time()
        result = fine_tune_split(model, train, dev, config=config, metric="accuracy")
        inversion = attack(model, train, public, config=config, special_ids=special,
                           attack_config=AttackConfig(kind="nearest", max_private_examples=500))
        rows.append({"eta": None if math.isinf(eta) else eta, "cti": cti,
                     "dev_accuracy": result.metrics["dev"]["accuracy"], "recovery": inversion.recovery,
                     "empirical_privacy": inversion.empirical_privacy, "seconds": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results" / ("split_sst2_quick.json" if args.quick else "split_sst2.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"train_examples": count, "dev_examples": len(dev["input_ids"]), "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
