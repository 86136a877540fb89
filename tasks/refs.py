"""Small frozen references that tasks return and take: paths plus content hashes, never models or tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privacy.files import sha256_of  # noqa: F401  (re-exported: the refs' digests)


@dataclass(frozen=True, kw_only=True)
class DataRef:
    """Tokenised train/dev splits on disk and keyed fingerprints (privacy.fingerprint) of the raw data: `fingerprint`
    of the splits used, `source_fingerprint` of the whole train file they were drawn from (the dataset whose lifetime
    privacy budget the persistent dataset ledger keeps). `source`: where the raw data was read (the local task folder,
    or the HF hub dataset's address)."""

    path: str
    fingerprint: str
    source_fingerprint: str
    task: str
    metric: str
    num_labels: int
    num_train: int
    num_dev: int
    files: dict[str, str] = field(default_factory=dict)  # path -> keyed digest (owner key) of the encoded splits
    source: str = ""

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
    masks_sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatsRef:
    """Tensors saved at `path` (a torch file): statistics of layer inputs released from the private data with DP
    (with the ledger that recorded it), or computed on public text (no ledger), e.g. a teacher's outputs."""

    stage: str
    path: str
    sha256: str
    ledger_path: str | None = None
    ledger_sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvalRef:
    """Dev-set results of one model (small: a dict of numbers)."""

    stage: str
    model_sha256: str
    results: dict = field(default_factory=dict)
    run_id: str = ""
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its outputs (results, HF export)


@dataclass(frozen=True, kw_only=True)
class SplitRef:
    """One split fine-tuning configuration (compression.split) and what it produced: its results at `path`
    (split.json: the dev metric, steps; no model is kept) and its release record at `record_path` (what crossed and
    under which local guarantee: not a privacy ledger, it enters no epsilon), and its MLflow run."""

    stage: str
    split_layer: int
    eta: float  # math.inf: no noise
    cti: bool
    path: str
    sha256: str
    record_path: str
    record_sha256: str
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
