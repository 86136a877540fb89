"""Cache keys for study stages: the stage's inputs (config sections and upstream refs, which carry content
hashes) plus the code version of every library the stage runs. Reused across flow runs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from privacy import files

_PACKAGES = ("compression", "privacy", "tasks")
# Where results are logged does not change what they are: a new study run reuses the stages it shares.
# Nor does the run that charges the dataset ledger (a fresh id per run): a RunContext is never in a key.
NOT_IN_KEY = frozenset({"on_step", "tracking_uri", "parent_run_id", "account", "context"})


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the source of compression/, privacy/ and tasks/ (Prefect's TASK_SOURCE misses the libraries)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(str(source.relative_to(root)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """A canonical JSON-able form of configs (dataclasses, pydantic models), refs, paths and containers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__, **{f.name: jsonable(getattr(value, f.name))
                                                     for f in dataclasses.fields(value)}}
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def inputs_key(stage: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps({"stage": stage, "code": code_version(), "inputs": jsonable(inputs)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_once(path: Path, compute) -> Path:
    """`path` if it exists, else `compute()` saved there atomically first (public, per-input caches shared by lines)."""
    if not path.exists():
        files.torch_save(compute(), path)
    return path


def stage_dir(output_dir: str | Path, stage: str, inputs: dict[str, Any]) -> Path:
    """Where a stage writes: one folder per distinct input, so a changed setting never overwrites a result."""
    return Path(output_dir) / "stages" / f"{stage}-{inputs_key(stage, inputs)[:12]}"


@dataclasses.dataclass
class StageInputs(CachePolicy):
    """Prefect cache policy: key = stage name + code version + every task parameter (canonical JSON)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        stage = inputs.get("stage") or task_ctx.task.name
        return inputs_key(str(stage), {k: v for k, v in inputs.items() if k not in NOT_IN_KEY})


STAGE_CACHE = StageInputs()
