"""Tests for compression.data: GLUE loading against the bundled TSVs, errors, fingerprints, encoding."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from compression.data import (
    GLUE_TASKS,
    DataConfig,
    Split,
    encode,
    fingerprint,
    load_encoded,
    load_split,
    load_task,
    save_encoded,
)

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


@pytest.fixture(scope="module")
def glue_dir() -> str:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return str(GLUE_DIR)


# --- real data -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("task", "split", "rows", "ones"),
    [
        ("sst2", "train", 67349, 37569),
        ("sst2", "dev", 872, 444),
        ("cola", "train", 8551, 6023),
        ("cola", "dev", 1043, 721),
        ("mrpc", "train", 3668, 2474),
        ("mrpc", "dev", 408, 279),
        ("qnli", "dev", 5463, 2761),  # index 1 == not_entailment (HF order)
    ],
)
def test_classification_splits_match_readme_counts(glue_dir, task, split, rows, ones):
    spec = GLUE_TASKS[task]
    data = load_split(spec, data_dir=glue_dir, split=split)
    assert len(data.labels) == rows
    assert len(data.texts) == len(spec.text_columns)
    assert all(len(col) == rows for col in data.texts)
    assert all(type(label) is int for label in data.labels)
    assert set(data.labels) == {0, 1}
    assert sum(data.labels) == ones


@pytest.mark.parametrize(("split", "rows"), [("train", 5749), ("dev", 1500)])
def test_stsb_is_float_regression_in_range(glue_dir, split, rows):
    spec = GLUE_TASKS["stsb"]
    data = load_split(spec, data_dir=glue_dir, split=split)
    assert spec.is_regression and spec.num_labels == 1
    assert len(data.labels) == rows and len(data.texts) == 2
    assert all(type(label) is float and 0.0 <= label <= 5.0 for label in data.labels)
    assert data.labels[0] == 5.0


def test_texts_are_stripped_and_pairs_give_two_lists(glue_dir):
    sst2 = load_split(GLUE_TASKS["sst2"], data_dir=glue_dir, split="dev")
    assert sst2.texts[0][0] == "it 's a charming and often affecting journey ."
    mrpc = load_split(GLUE_TASKS["mrpc"], data_dir=glue_dir, split="dev")  # header starts with a BOM
    assert len(mrpc.texts) == 2
    assert mrpc.texts[1][0].startswith('" The foodservice pie business')
    cola = load_split(GLUE_TASKS["cola"], data_dir=glue_dir, split="dev")  # no header line
    assert cola.texts[0][0] == "The sailors rode the breeze clear of the rocks."


def test_registry_is_complete_and_consistent():
    assert set(GLUE_TASKS) == {"sst2", "cola", "stsb", "qnli", "mnli", "qqp", "mrpc", "rte"}
    metrics = {name: spec.metric for name, spec in GLUE_TASKS.items()}
    assert metrics == {"sst2": "accuracy", "cola": "matthews", "stsb": "pearson_spearman",
                       "qnli": "accuracy", "mnli": "accuracy", "qqp": "f1", "mrpc": "f1",
                       "rte": "accuracy"}
    assert GLUE_TASKS["mnli"].num_labels == 3 and GLUE_TASKS["mnli"].dev_file == "dev_matched.tsv"
    assert GLUE_TASKS["qnli"].label_names == ("entailment", "not_entailment")
    for name, spec in GLUE_TASKS.items():
        assert spec.name == name and spec.hf_config == name
    # what the classes mean (the HF glue dataset's names), for exported and served models: never a bare digit
    names = {name: spec.id2label and tuple(spec.id2label.values()) for name, spec in GLUE_TASKS.items()}
    assert names == {"sst2": ("negative", "positive"), "cola": ("unacceptable", "acceptable"), "stsb": None,
                     "qnli": ("entailment", "not_entailment"), "mnli": ("entailment", "neutral", "contradiction"),
                     "qqp": ("not_duplicate", "duplicate"), "mrpc": ("not_equivalent", "equivalent"),
                     "rte": ("entailment", "not_entailment")}
    assert all(list(spec.id2label) == list(range(spec.num_labels)) for spec in GLUE_TASKS.values() if spec.id2label)


def test_subsampling_is_deterministic_and_seed_sensitive(glue_dir):
    cfg = DataConfig(task="sst2", dir=glue_dir, max_train_examples=50, max_eval_examples=20, seed=3)
    spec, train_a, dev_a = load_task(cfg)
    _, train_b, dev_b = load_task(cfg)
    _, train_c, dev_c = load_task(dataclasses.replace(cfg, seed=4))
    assert spec is GLUE_TASKS["sst2"]
    assert (len(train_a), len(dev_a)) == (50, 20)
    assert train_a == train_b and dev_a == dev_b
    assert fingerprint(train_a, key=KEY) != fingerprint(train_c, key=KEY)
    assert fingerprint(dev_a, key=KEY) != fingerprint(dev_c, key=KEY)
    full_dev = load_split(spec, data_dir=glue_dir, split="dev")
    assert set(dev_a.texts[0]) <= set(full_dev.texts[0])


def test_caps_at_or_above_split_size_keep_everything(glue_dir):
    cfg = DataConfig(task="cola", dir=glue_dir, max_train_examples=10**6, max_eval_examples=1043)
    _, train, dev = load_task(cfg)
    full = load_split(GLUE_TASKS["cola"], data_dir=glue_dir, split="train")
    assert len(train) == 8551 and len(dev) == 1043
    assert fingerprint(train, key=KEY) == fingerprint(full, key=KEY)


def test_smaller_eval_cap_is_a_subset_of_larger(glue_dir):
    small = load_task(DataConfig(task="mrpc", dir=glue_dir, max_eval_examples=10))[2]
    large = load_task(DataConfig(task="mrpc", dir=glue_dir, max_eval_examples=100))[2]
    assert set(small.texts[0]) <= set(large.texts[0])


# --- fingerprint -----------------------------------------------------------------------------

def _pair_split() -> Split:
    return Split((["a b", "c d", "e"], ["x", "y", "z"]), [0, 1, 0])


KEY = b"k" * 32


def test_fingerprint_stable_and_sensitive():
    def fp(*splits):
        return fingerprint(*splits, key=KEY)
    base = fp(_pair_split())
    assert base == fp(_pair_split())
    assert len(base) == 64 and int(base, 16) >= 0
    assert fp(Split((["a b", "c d", "e"], ["x", "y", "z"]), [0, 1, 1])) != base
    assert fp(Split((["a b", "c d", "e"], ["x", "Y", "z"]), [0, 1, 0])) != base
    assert fp(Split((["c d", "a b", "e"], ["y", "x", "z"]), [1, 0, 0])) != base  # order
    assert fp(Split((["a b", "c d", "e"], ["x", "y", "z"]), [0.0, 1.0, 0.0])) != base
    one, two = Split((["a"],), [0]), Split((["b"],), [1])
    assert fp(one, two) != fp(two, one)
    assert fp(one, two) != fp(Split((["a", "b"],), [0, 1]))


def test_fingerprint_is_keyed_so_a_guess_cannot_be_tested_without_the_key():
    """Someone who knows every record but one cannot check a candidate against a published fingerprint: without the
    owner's key, the plain sha256 of the data (the old fingerprint) and any other key give other values."""
    import hashlib
    import json

    split = _pair_split()
    published = fingerprint(split, key=KEY)
    assert published == fingerprint(split, key=bytes(KEY))  # same data, same key: same value (caches work)
    assert published != fingerprint(split, key=b"x" * 32)
    record = {"texts": [list(col) for col in split.texts], "labels": list(split.labels)}
    plain = hashlib.sha256(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
    assert published != plain


def test_owner_key_is_created_once_owner_only(tmp_path):
    from privacy.fingerprint import owner_key

    key = owner_key(tmp_path / "home")
    assert len(key) == 32 and owner_key(tmp_path / "home") == key
    assert (tmp_path / "home" / "fingerprint.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700
    assert owner_key(tmp_path / "other") != key


def test_row_hashes_find_shared_texts_across_columns_and_case():
    from compression.data import row_hashes

    private = Split((["The cat sat ", "a dog"],), [0, 1])
    public = Split((["x y", "z"], ["THE  cat sat", "w"]), [0, 1])  # a pair whose second sentence is private
    assert row_hashes(private, key=KEY) & row_hashes(public, key=KEY)
    assert not row_hashes(private, key=KEY) & row_hashes(Split((["a cat"],), [0]), key=KEY)


# --- errors on synthetic folders -------------------------------------------------------------

def _write(root: Path, folder: str, name: str, text: str) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_names_path_task_and_split(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_split(GLUE_TASKS["qnli"], data_dir=str(tmp_path), split="train")
    message = str(err.value)
    assert str(tmp_path / "QNLI" / "train.tsv") in message
    assert "qnli" in message and "train" in message


def test_missing_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path, "SST-2", "dev.tsv", "text\tlabel\nhello \t1\n")
    with pytest.raises(ValueError) as err:
        load_split(GLUE_TASKS["sst2"], data_dir=str(tmp_path), split="dev")
    message = str(err.value)
    assert str(path) in message and "'sentence'" in message and "'text'" in message


def test_bad_label_names_file_row_value_and_allowed(tmp_path):
    path = _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\nok \t1\nbad \t2\n")
    with pytest.raises(ValueError) as err:
        load_split(GLUE_TASKS["sst2"], data_dir=str(tmp_path), split="dev")
    message = str(err.value)
    assert str(path) in message and "row 2" in message and "'2'" in message and "'0', '1'" in message


def test_bad_nli_label_lists_allowed_names(tmp_path):
    _write(tmp_path, "QNLI", "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq?\ts.\tmaybe\n")
    with pytest.raises(ValueError, match=r"row 1.*'maybe'.*'entailment', 'not_entailment'"):
        load_split(GLUE_TASKS["qnli"], data_dir=str(tmp_path), split="dev")


def test_stsb_score_out_of_range(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tg\tf\ty\t0\tn\tn\ta\tb\t{}\n"
    path = _write(tmp_path, "STS-B", "dev.tsv", header + row.format("2.5") + row.format("5.5"))
    with pytest.raises(ValueError) as err:
        load_split(GLUE_TASKS["stsb"], data_dir=str(tmp_path), split="dev")
    assert str(path) in str(err.value) and "row 2" in str(err.value) and "'5.5'" in str(err.value)


def test_headerless_cola_with_quotes_kept_literally(tmp_path):
    _write(tmp_path, "CoLA", "dev.tsv", 'src\t0\t*\t"Quoted start.\nsrc\t1\t\tPlain. ')
    data = load_split(GLUE_TASKS["cola"], data_dir=str(tmp_path), split="dev")
    assert data.texts == (['"Quoted start.', "Plain."],) and data.labels == [0, 1]


def test_unknown_task_and_split_list_allowed_names(tmp_path):
    with pytest.raises(ValueError, match=r"'sst-2'.*cola.*mrpc.*sst2"):
        DataConfig(task="sst-2")
    with pytest.raises(ValueError, match=r"'test'.*train, dev"):
        load_split(GLUE_TASKS["sst2"], data_dir=str(tmp_path), split="test")


# --- encoding --------------------------------------------------------------------------------

def test_encode_pairs_have_segment_ids_and_truncate(tokenizer):
    split = Split((["the cat sat", "a dog"], ["on the mat", "the cat sat on a mat the dog"]), [1, 0])
    encoded = encode(split, tokenizer, max_length=8)
    assert set(encoded) == {"input_ids", "token_type_ids", "labels"}
    assert encoded["labels"].dtype == torch.long and encoded["labels"].tolist() == [1, 0]
    first, types = encoded["input_ids"][0], encoded["token_type_ids"][0]
    assert len(first) == len(types) == 8  # [CLS] the cat sat [SEP] on the mat [SEP] -> 9, truncated
    assert 1 in types and types[0] == 0
    assert all(len(ids) <= 8 for ids in encoded["input_ids"])


def test_encode_single_and_regression(tokenizer):
    encoded = encode(Split((["the cat", "dog"],), [0.5, 4.0]), tokenizer, max_length=16)
    assert encoded["labels"].dtype == torch.float32
    assert encoded["input_ids"][0] == tokenizer("the cat")["input_ids"]
    assert all(set(types) == {0} for types in encoded["token_type_ids"])


def test_encode_fills_zero_segments_when_tokenizer_has_none():
    def bare_tokenizer(texts, truncation, max_length):
        return {"input_ids": [[7] * min(len(t), max_length) for t in texts]}

    encoded = encode(Split((["abc", "de"],), [1, 0]), bare_tokenizer, max_length=2)
    assert encoded["token_type_ids"] == [[0, 0], [0, 0]]


def test_save_load_round_trip(tokenizer, tmp_path):
    encoded = encode(_pair_split(), tokenizer, max_length=16)
    path = tmp_path / "nested" / "dev.pt"
    save_encoded(path, encoded)
    loaded = load_encoded(path)
    assert loaded["input_ids"] == encoded["input_ids"]
    assert loaded["token_type_ids"] == encoded["token_type_ids"]
    assert torch.equal(loaded["labels"], encoded["labels"])


def test_a_sample_of_encoded_data_keeps_order_and_alignment():
    from compression.data import sample_encoded

    data = {"input_ids": [[2, i, 3] for i in range(20)], "token_type_ids": [[0, 0, 0]] * 20,
            "labels": torch.arange(20)}
    sample = sample_encoded(data, 5, seed=1)
    kept = [ids[1] for ids in sample["input_ids"]]
    assert len(kept) == 5 and kept == sorted(kept) and sample["labels"].tolist() == kept
    assert sample["input_ids"] == sample_encoded(data, 5, seed=1)["input_ids"]
    assert kept != [ids[1] for ids in sample_encoded(data, 5, seed=2)["input_ids"]]
    assert sample_encoded(data, None, seed=0) is data and sample_encoded(data, 20, seed=0) is data
