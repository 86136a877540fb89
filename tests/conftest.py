"""Shared test setup: offline Hugging Face, one torch thread, a session-private DPCOMPRESS_HOME, and the real servers
(MLflow, Prefect) of the end-to-end tests, started once per session (per worker under pytest-xdist)."""
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The data owner's state (fingerprint key, dataset ledger) of the test session: never the user's ~/.dpcompress.
os.environ.setdefault("DPCOMPRESS_HOME", tempfile.mkdtemp(prefix="dpcompress-home-"))

import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# The suite runs beside subprocess servers on 2 cores: one intra-op thread avoids oversubscription stalls.
torch.set_num_threads(1)

pytest_plugins = ["preflight_study"]  # the pre-flight tests' small study and its fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny BERT WordPiece tokenizer over a 12-word vocabulary (no download)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115  (the server writes it)
        # no job-runner process (MLflow 3's huey consumer): the tests schedule no server jobs, and its start-up
        # competed with the tests for the 2 cores
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
    else:
        proc.kill()
        pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_backend(tmp_path_factory):
    """A temporary Prefect server (a real API process) and result storage in a folder of the session's own, shared
    by the end-to-end modules (starting one takes tens of seconds on 2 cores)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield storage
