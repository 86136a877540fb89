"""A small study that passes pre-flight, and ways to break it: a plugin of the suite (tests/conftest.py) for the
pre-flight and run-failure tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main

SST2_TRAIN = "sentence\tlabel\n" + "".join(f"a private sentence number {i} \t{i % 2}\n" for i in range(40))
SST2_DEV = "sentence\tlabel\n" + "".join(f"a dev sentence {i} \t{i % 2}\n" for i in range(8))
CONFIG = """\
name: pf
output_dir: {tmp}/runs
data: {{task: sst2, dir: {tmp}/glue, max_train_examples: 32}}
model: {{name_or_path: {tmp}/model}}
privacy: {{epsilon: 8.0, accountant: rdp, dataset_ledger: {tmp}/ledger.db}}
teacher: {{train: {{epochs: 1, batch_size: 16}}}}
prune: {{schedule: {{rounds: 1}}, train: {{epochs: 1, batch_size: 16}}}}
distill: {{train: {{epochs: 1, batch_size: 16}}}}
tracking: {{uri: "sqlite:///{tmp}/mlflow/mlflow.db"}}
"""


class Study:
    """A study that passes pre-flight (synthetic GLUE files, a model folder with a config and a vocabulary, PLD
    accounting: quick), and ways to break it."""

    def __init__(self, tmp: Path, monkeypatch):
        self.tmp, self.glue, self.model, self.monkeypatch = tmp, tmp / "glue", tmp / "model", monkeypatch
        self.write("glue/SST-2/train.tsv", SST2_TRAIN)
        self.write("glue/SST-2/dev.tsv", SST2_DEV)
        self.write("glue/CoLA/train.tsv", "".join(f"src\t1\t\tpublic text {i} .\n" for i in range(20)))
        self.write("glue/CoLA/dev.tsv", "src\t1\t\ta public dev row .\n")
        self.write("model/config.json", json.dumps({"model_type": "bert"}))
        self.write("model/vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
        self.config = self.write("study.yaml", CONFIG.format(tmp=tmp))

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def add(self, text: str) -> None:
        """Append YAML to the config (a later top-level key must be new: duplicates are refused)."""
        self.config.write_text(self.config.read_text() + text)

    def replace(self, old: str, new: str) -> None:
        text = self.config.read_text()
        assert old in text, old
        self.config.write_text(text.replace(old, new))


@pytest.fixture
def study(tmp_path, monkeypatch) -> Study:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("DPCOMPRESS_GLUE_DIR", raising=False)
    return Study(tmp_path, monkeypatch)


@pytest.fixture
def no_server(monkeypatch):
    """Fails the test if `dpcompress run` gets past pre-flight (it would start a Prefect server)."""
    import flows.cli

    def refuse(*args, **kwargs):
        pytest.fail("a server was started although pre-flight should have refused")

    monkeypatch.setattr(flows.cli, "prefect_api", refuse)


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


