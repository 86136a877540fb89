import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

import torch  # noqa: E402

# The suite runs beside subprocess servers on 2 cores: one intra-op thread avoids oversubscription stalls.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny BERT WordPiece tokenizer over a 12-word vocabulary (no download)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)

# The data owner's state (fingerprint key, dataset ledger) of the test session: never the user's ~/.dpcompress.
import tempfile  # noqa: E402

os.environ.setdefault("DPCOMPRESS_HOME", tempfile.mkdtemp(prefix="dpcompress-home-"))
