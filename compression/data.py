"""GLUE task registry, loading (local TSVs or the HF hub), subsampling, fingerprinting, tokenising, and the one
batching helper every pass over encoded examples uses (length-sorted chunks, right-padded).

Pure data plumbing: no models, no training, no tracking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compression.glue_files import read_columns
from privacy import files
from privacy.fingerprint import KeyedDigest, keyed_hash

logger = logging.getLogger(__name__)

HF_DATASET = "nyu-mll/glue"
_SPLITS = ("train", "dev")


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """How one GLUE task is laid out on disk and on the hub.

    `label_names` are the raw label strings of the TSV in class-index order, matching the HF
    `glue` label ids (index i == HF label i); None marks a regression task (STS-B, scores 0-5).
    `class_names` are what the classes mean, in the same order (the HF `glue` dataset's names), where the raw
    labels are bare digits: the exported model's and the served predictions' labels (`id2label`).
    `hf_text_columns` names the text columns in the HF dataset where they differ from the TSV.
    """

    name: str
    folder: str
    train_file: str
    dev_file: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metric: str
    header: bool = True
    columns: tuple[str, ...] | None = None
    hf_config: str = ""
    hf_text_columns: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def id2label(self) -> dict[int, str] | None:
        """Class index -> name (`class_names`, else the raw labels); None for a regression task."""
        names = self.class_names or self.label_names
        return None if names is None else dict(enumerate(names))


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(name="sst2", folder="SST-2", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("sentence",), label_column="label", label_names=_BINARY,
                 metric="accuracy", hf_config="sst2", class_names=("negative", "positive")),
        TaskSpec(name="cola", folder="CoLA", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("sentence",), label_column="label", label_names=_BINARY,
                 metric="matthews", header=False, columns=("source", "label", "mark", "sentence"),
                 hf_config="cola", class_names=("unacceptable", "acceptable")),
        TaskSpec(name="stsb", folder="STS-B", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("sentence1", "sentence2"), label_column="score", label_names=None,
                 metric="pearson_spearman", hf_config="stsb"),
        TaskSpec(name="qnli", folder="QNLI", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("question", "sentence"), label_column="label", label_names=_NLI2,
                 metric="accuracy", hf_config="qnli"),
        TaskSpec(name="mnli", folder="MNLI", train_file="train.tsv", dev_file="dev_matched.tsv",
                 text_columns=("sentence1", "sentence2"), label_column="gold_label",
                 label_names=("entailment", "neutral", "contradiction"), metric="accuracy",
                 hf_config="mnli", hf_text_columns=("premise", "hypothesis")),
        TaskSpec(name="qqp", folder="QQP", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("question1", "question2"), label_column="is_duplicate",
                 label_names=_BINARY, metric="f1", hf_config="qqp", class_names=("not_duplicate", "duplicate")),
        TaskSpec(name="mrpc", folder="MRPC", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("#1 String", "#2 String"), label_column="Quality",
                 label_names=_BINARY, metric="f1", hf_config="mrpc",
                 hf_text_columns=("sentence1", "sentence2"), class_names=("not_equivalent", "equivalent")),
        TaskSpec(name="rte", folder="RTE", train_file="train.tsv", dev_file="dev.tsv",
                 text_columns=("sentence1", "sentence2"), label_column="label", label_names=_NLI2,
                 metric="accuracy", hf_config="rte"),
    )
}


def _check_task(name: str) -> TaskSpec:
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; allowed: {', '.join(sorted(GLUE_TASKS))}")
    return GLUE_TASKS[name]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which task to load and how much of it.

    `dir` is a local GLUE folder (holding SST-2/, CoLA/ ...) or None for the HF hub.
    `max_train_examples` / `max_eval_examples` cap the splits by a seeded sample (None: all rows).
    `max_length` is the truncation length in tokens.
    """

    task: str
    dir: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_task(self.task)
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"DataConfig.{key} must be >= 1 or None, got {value}")
        if self.max_length < 2:
            raise ValueError(f"DataConfig.max_length must be >= 2 tokens, got {self.max_length}")


@dataclass(frozen=True)
class Split:
    """One split after loading, before tokenising: one text list per text column, and labels
    (class indices as int, or regression scores as float)."""

    texts: tuple[list[str], ...]
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices) -> Split:
        """Rows at `indices`, in the order given."""
        idx = [int(i) for i in indices]
        return Split(tuple([col[i] for i in idx] for col in self.texts), [self.labels[i] for i in idx])


def _load_local(spec: TaskSpec, data_dir: str, split: str) -> Split:
    path = Path(data_dir) / spec.folder / (spec.train_file if split == "train" else spec.dev_file)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE task {spec.name!r} split {split!r}: no file at {path.resolve()}"
                                f"{_why_missing(Path(data_dir), spec)}")
    texts, labels = read_columns(path, spec)
    logger.info("loaded %s %s: %d rows from %s", spec.name, split, len(labels), path)
    return Split(texts, labels)


def _why_missing(root: Path, spec: TaskSpec) -> str:
    if not root.is_dir():
        return f" (the GLUE folder {root.resolve()} does not exist)"
    if not (root / spec.folder).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        return f" (the GLUE folder has no {spec.folder}/; it has {found})"
    return ""


def _load_hub(spec: TaskSpec, split: str) -> Split:
    import datasets  # deferred: importing datasets is slow and only the hub path needs it

    hf_split = "validation_matched" if spec.name == "mnli" else "validation"
    hf_split = "train" if split == "train" else hf_split
    where = f"{HF_DATASET}/{spec.hf_config}[{hf_split}]"
    dataset = datasets.load_dataset(HF_DATASET, spec.hf_config, split=hf_split)
    columns = spec.hf_text_columns or spec.text_columns
    for column in (*columns, "label"):
        if column not in dataset.column_names:
            raise ValueError(f"{where}: missing column {column!r}; columns found: {dataset.column_names}")
    texts = tuple([str(text).strip() for text in dataset[column]] for column in columns)
    if spec.is_regression:
        labels = [float(x) for x in dataset["label"]]
    else:
        labels = [int(x) for x in dataset["label"]]
        bad = [(row, x) for row, x in enumerate(labels, start=1) if not 0 <= x < spec.num_labels]
        if bad:
            row, value = bad[0]
            raise ValueError(f"{where}: data row {row}: label {value} outside 0..{spec.num_labels - 1}")
    logger.info("loaded %s %s: %d rows from %s", spec.name, split, len(labels), where)
    return Split(texts, labels)


def load_split(spec: TaskSpec, *, data_dir: str | None, split: str) -> Split:
    """Load one split ("train" or "dev") of `spec`, from the GLUE folder `data_dir` or, when it is
    None, from the HF hub. Texts are whitespace-stripped; labels are class indices or float scores."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_SPLITS)}")
    if data_dir is None:
        return _load_hub(spec, split)
    return _load_local(spec, data_dir, split)


def _subsample(split: Split, max_examples: int | None, seed: int) -> Split:
    """A seeded sample of `max_examples` rows, kept in file order; all rows when the cap is None or
    not smaller than the split. The first N of one seeded permutation, so smaller caps give subsets."""
    if max_examples is None or max_examples >= len(split):
        return split
    order = np.random.default_rng(seed).permutation(len(split))
    return split.select(np.sort(order[:max_examples]))


def sample_encoded(data: dict, max_examples: int | None, *, seed: int) -> dict:
    """`_subsample` of encoded `data` (the output of `encode`): a seeded sample of `max_examples` examples in their
    order; `data` itself when the cap is None or not smaller."""
    count = len(data["input_ids"])
    if max_examples is None or max_examples >= count:
        return data
    rows = np.sort(np.random.default_rng(seed).permutation(count)[:max_examples]).tolist()
    return {"input_ids": [data["input_ids"][i] for i in rows],
            "token_type_ids": [data["token_type_ids"][i] for i in rows], "labels": data["labels"][rows]}


def load_source(cfg: DataConfig) -> tuple[TaskSpec, Split, Split]:
    """(spec, train, dev) for `cfg.task`, whole: the source a study's subsamples are drawn from."""
    spec = _check_task(cfg.task)
    return spec, load_split(spec, data_dir=cfg.dir, split="train"), load_split(spec, data_dir=cfg.dir, split="dev")


def subsample_task(cfg: DataConfig, train: Split, dev: Split) -> tuple[Split, Split]:
    """Each split capped by its seeded sample from `cfg`."""
    train = _subsample(train, cfg.max_train_examples, cfg.seed)
    dev = _subsample(dev, cfg.max_eval_examples, cfg.seed)
    logger.info("task %s: %d train / %d dev examples (seed %d)", cfg.task, len(train), len(dev), cfg.seed)
    return train, dev


def load_task(cfg: DataConfig) -> tuple[TaskSpec, Split, Split]:
    """(spec, train, dev) for `cfg.task`, each split capped by its seeded sample from `cfg`."""
    spec, train, dev = load_source(cfg)
    return (spec, *subsample_task(cfg, train, dev))


def fingerprint(*splits: Split, key: bytes) -> str:
    """Keyed fingerprint (HMAC-SHA256 under `key`, privacy.fingerprint.owner_key) of a canonical JSON serialisation
    of the splits' texts and labels, in order. Without the key, nobody can test a guess about a record against it.

    Any change to a text, a label, a label's type (1 vs 1.0), the row order or the split order
    changes the fingerprint."""
    digest = KeyedDigest(key, f"dpcompress.data.fingerprint/v2 n={len(splits)}")
    for split in splits:
        record = {"texts": [list(col) for col in split.texts], "labels": list(split.labels)}
        digest.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def normalise_text(text: str) -> str:
    """Lower case, whitespace collapsed: the form in which rows of two datasets are compared."""
    return " ".join(text.lower().split())


def row_hashes(split: Split, *, key: bytes) -> set[str]:
    """Keyed hashes of every text of `split` (each text column on its own, normalised): rows of two datasets can be
    compared for overlap (a pair's sentence found alone elsewhere counts) without either being revealed."""
    return {keyed_hash(key, normalise_text(text)) for column in split.texts for text in column if text.strip()}


def encode(split: Split, tokenizer, *, max_length: int) -> dict[str, torch.Tensor | list]:
    """Tokenise `split` (pairs as `tokenizer(a, b)`), truncating to `max_length` tokens, unpadded.

    Returns {"input_ids": list[list[int]], "token_type_ids": list[list[int]] (zeros when the tokenizer
    has none), "labels": tensor (long for class indices, float32 for regression scores)}."""
    if not 1 <= len(split.texts) <= 2:
        raise ValueError(f"encode expects 1 or 2 text columns, got {len(split.texts)}")
    batch = tokenizer(*split.texts, truncation=True, max_length=max_length)
    input_ids = [list(ids) for ids in batch["input_ids"]]
    if "token_type_ids" in batch:
        token_type_ids = [list(types) for types in batch["token_type_ids"]]
    else:
        token_type_ids = [[0] * len(ids) for ids in input_ids]
    regression = any(isinstance(label, float) for label in split.labels)
    labels = torch.tensor(split.labels, dtype=torch.float32 if regression else torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "labels": labels}


def save_encoded(path, encoded: dict) -> None:
    """Write the output of `encode` to `path` atomically (parent folders are created)."""
    files.torch_save(encoded, path)


def load_encoded(path) -> dict:
    """Read what `save_encoded` wrote (weights_only: plain lists and tensors only)."""
    return torch.load(Path(path), weights_only=True)


def pad(sequences: Sequence[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token tensors or 2-D hidden-state tensors; returns (padded, attention_mask)."""
    length = max(len(s) for s in sequences)
    out = sequences[0].new_full((len(sequences), length, *sequences[0].shape[1:]), value)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return out, mask


def length_chunks(index: torch.Tensor, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split example indices into chunks of similar length (less padding), at most `size` each; none for no index."""
    order = index[torch.argsort(lengths[index], stable=True)]
    return [chunk for chunk in order.split(size) if len(chunk)]


def collate(data: dict, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) `[B, L]` of the examples `index` of `encode`-style `data`."""
    rows = [int(i) for i in index]
    input_ids, mask = pad([torch.as_tensor(data["input_ids"][i]) for i in rows])
    token_types, _ = pad([torch.as_tensor(data["token_type_ids"][i]) for i in rows])
    return input_ids, mask, token_types


def lengths_of(data: dict) -> torch.Tensor:
    """Token count of every example of `data`."""
    return torch.tensor([len(ids) for ids in data["input_ids"]])


def padded_batches(data: dict, batch_size: int, index: torch.Tensor | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every example of `data` (or of `index`) once, in batches of similar length of at most `batch_size`:
    (example indices, input_ids, attention_mask, token_type_ids)."""
    index = torch.arange(len(data["input_ids"])) if index is None else index
    for chunk in length_chunks(index, lengths_of(data), batch_size):
        yield (chunk, *collate(data, chunk))
