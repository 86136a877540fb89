"""Small frozen references that tasks return and take: paths plus content hashes, never models or tensors."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Content hash of a file, or of a folder (relative names and bytes of every file, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DataRef:
    """Tokenised train/dev splits on disk and keyed fingerprints (privacy.fingerprint) of the raw data: `fingerprint`
    of the splits used, `source_fingerprint` of the whole train file they were drawn from (the dataset whose lifetime
    privacy budget the persistent dataset ledger keeps)."""

    path: str
    fingerprint: str
    source_fingerprint: str
    task: str
    metric: str
    num_labels: int
    num_train: int
    num_dev: int

    @property
    def train_file(self) -> Path:
        return Path(self.path) / "train.pt"

    @property
    def dev_file(self) -> Path:
        return Path(self.path) / "dev.pt"


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    """A saved model folder, the privacy ledger of everything that produced it, and its MLflow run."""

    stage: str
    path: str
    sha256: str
    ledger_path: str
    ledger_sha256: str
    epsilon: float
    delta: float
    run_id: str = ""
    masks_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatsRef:
    """Tensors saved at `path` (a torch file): statistics of layer inputs released from the private data with DP
    (with the ledger that recorded it), or computed on public text (no ledger), e.g. a teacher's outputs."""

    stage: str
    path: str
    sha256: str
    ledger_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvalRef:
    """Dev-set results of one model (small: a dict of numbers)."""

    stage: str
    model_sha256: str
    results: dict = field(default_factory=dict)
    run_id: str = ""


@dataclass(frozen=True, kw_only=True)
class BudgetAccount:
    """Where a study run's releases are charged: the persistent dataset ledger (privacy.dataset_ledger) at `url`,
    the dataset's keyed source fingerprint, the run that reserved, and the lifetime budget checked at `delta`."""

    url: str
    dataset: str
    study: str
    study_key: str
    run_id: str
    epsilon_budget: float
    delta: float
    accountant: str


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """Where a stage logs and what it charges; none of it changes what the stage computes (not in cache keys)."""

    tracking_uri: str
    parent_run_id: str
    account: BudgetAccount | None = None
