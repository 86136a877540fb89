"""tasks.data.prepare_data: keyed fingerprints only, and "public" text that shares a text with the private source
is refused, naming both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression.data import DataConfig
from tasks import tracking
from tasks.data import prepare_data
from tasks.refs import RunContext

SST2 = "sentence\tlabel\n" + "".join(f"private sentence number {i} \t{i % 2}\n" for i in range(30))


def _glue(root: Path, cola_rows: list[str]) -> Path:
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text(SST2)
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nsome dev sentence \t1\n")
    (root / "CoLA").mkdir()
    (root / "CoLA" / "train.tsv").write_text("".join(f"src\t1\t\t{row}\n" for row in cola_rows))
    (root / "CoLA" / "dev.tsv").write_text("src\t1\t\ta dev row .\n")
    return root


@pytest.fixture(scope="module")
def tracking_run(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, tracking.study_run(uri=uri, experiment="t", study_key="k", name="t", config={})


def _prepare(glue: Path, task: str, tmp_path: Path, tracking_run, **kw):
    uri, parent = tracking_run
    return prepare_data.fn(data=DataConfig(task=task, dir=str(glue), max_train_examples=20), tokenizer_name=
                           "all-minilm-l6-v2", output_dir=str(tmp_path / "out"),
                           context=RunContext(tracking_uri=uri, parent_run_id=parent), **kw)


def test_public_text_sharing_a_private_text_is_refused(tmp_path, tracking_run):
    # the 25th private sentence is not in the 20-row subsample: the whole source file is private
    glue = _glue(tmp_path / "glue", ["a public sentence .", "PRIVATE  sentence number 25"])
    private = _prepare(glue, "sst2", tmp_path, tracking_run)
    with pytest.raises(ValueError, match=r"prepare_calibration_cola \(cola.*is not public.*sst2"):
        _prepare(glue, "cola", tmp_path, tracking_run, stage="prepare_calibration_cola", private=private)


def test_disjoint_public_text_passes_and_only_keyed_fingerprints_are_published(tmp_path, tracking_run):
    glue = _glue(tmp_path / "glue", ["a public sentence .", "another one ."])
    private = _prepare(glue, "sst2", tmp_path, tracking_run)
    public = _prepare(glue, "cola", tmp_path, tracking_run, stage="prepare_calibration_cola", private=private)
    assert public.num_train == 2 and private.num_train == 20
    meta = json.loads((Path(private.path) / "data.json").read_text())
    assert meta["fingerprint"] == private.fingerprint and len(private.source_fingerprint) == 64
    assert private.source_fingerprint != private.fingerprint  # the whole file vs the subsample
    assert "sha256" not in json.dumps(meta)


def test_edited_data_at_the_same_path_is_new_data(tmp_path, tracking_run):
    """Keyed on content: the same file path with its labels flipped is prepared again, with another fingerprint."""
    glue = _glue(tmp_path / "glue", ["a public sentence ."])
    before = _prepare(glue, "sst2", tmp_path, tracking_run)
    assert _prepare(glue, "sst2", tmp_path, tracking_run) == before  # unchanged: reused
    flipped = SST2.replace("\t0\n", "\tX\n").replace("\t1\n", "\t0\n").replace("\tX\n", "\t1\n")
    (glue / "SST-2" / "train.tsv").write_text(flipped)
    after = _prepare(glue, "sst2", tmp_path, tracking_run)
    assert after.fingerprint != before.fingerprint and after.path != before.path
