"""Reuse of finished work: every stage writes into a folder named by its inputs (config sections, upstream refs, which
carry content hashes, and the code version of every library it runs), and a finished stage leaves `done.json`: its
reference, whose files are verified (present, same digests) before it is reused. A cache hit therefore means the
outputs exist, verified, where the config says; a deleted or damaged output is recomputed. Prefect's own cache and
result storage are not used at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from privacy import files
from privacy.fingerprint import owner_key
from tasks.refs import DataRef, sha256_of
from tasks.serializer import RefSerializer

log = logging.getLogger(__name__)
_PACKAGES = ("compression", "privacy", "tasks")
# Where results are logged does not change what they are, so the tasks leave the tracking URI, the parent run and the
# RunContext (a fresh ledger id per run) out of the `inputs` they key by: a new study run reuses the stages it shares.
# Fields that cannot change a result: how often a crash-safe checkpoint is written, and the MLflow run an upstream
# reference was logged to (a property of the tracking store, not of the model).
FIELDS_NOT_IN_KEY = frozenset({"checkpoint_every", "run_id"})
DONE = "done.json"
RELEASED = "released.json"  # a private stage's outputs saved and charged; its logging may still be missing
SERIALIZER = RefSerializer()


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
                                                     for f in dataclasses.fields(value)
                                                     if f.name not in FIELDS_NOT_IN_KEY}}
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def inputs_key(stage: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps({"stage": stage, "code": code_version(), "inputs": jsonable(inputs)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_dir(output_dir: str | Path, stage: str, inputs: dict[str, Any]) -> Path:
    """Where a stage writes: one folder per distinct input, so a changed setting never overwrites a result."""
    return Path(output_dir) / "stages" / f"{stage}-{inputs_key(stage, inputs)[:12]}"


def _digests(ref) -> list[tuple[str, str, bool]]:
    """(path, digest, keyed) of every file a reference names, as it recorded them; the encoded private data's
    digests are keyed (a plain hash of them would let anyone who can encode a guess test it)."""
    pairs = [(getattr(ref, name), getattr(ref, f"{stem}sha256"))
             for name, stem in (("path", ""), ("ledger_path", "ledger_"), ("masks_path", "masks_"),
                                ("record_path", "record_"))
             if getattr(ref, name, None) and getattr(ref, f"{stem}sha256", None)]
    keyed = isinstance(ref, DataRef)
    return [(path, digest, False) for path, digest in pairs] + [
        (path, digest, keyed) for path, digest in getattr(ref, "files", {}).items()]


def finished(out: Path, marker: str = DONE):
    """The reference a finished stage left in `out` (in `marker`), if every file it names is there with the same
    digest; else None (never finished, interrupted, or an output deleted or damaged since: the stage runs again)."""
    try:
        ref = SERIALIZER.loads((out / marker).read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as err:
        log.warning("ignoring %s: %s", out / marker, err)
        return None
    for path, digest, keyed in _digests(ref):
        if not Path(path).exists() or sha256_of(path, key=owner_key() if keyed else None) != digest:
            log.warning("%s: %s is missing or changed since it was written: the stage runs again", out.name, path)
            return None
    return ref


def mark_released(out: Path, ref) -> None:
    """Record that a private stage's outputs (`ref`'s files) are saved and its release charged: a rerun that finds
    them intact logs them instead of training (and spending) again."""
    files.write_bytes(out / RELEASED, SERIALIZER.dumps(ref))


def mark_finished(out: Path, ref, logged: dict | None = None) -> None:
    """Record `ref` as the stage's result (written last, after every output), and what its run logged."""
    if logged is not None:
        files.write_text(out / "tracking.json", json.dumps(logged, indent=2))
    files.write_bytes(out / DONE, SERIALIZER.dumps(dataclasses.replace(ref, run_id="") if hasattr(ref, "run_id")
                                                   else ref))


# How tasks are declared: Prefect neither caches nor stores their results. Stages reuse their folders themselves
# (done.json, verified), and nothing is ever read back from Prefect's result storage: Prefect picks the serializer
# of a stored result from the file itself, so a result file someone replaced could run code when read.
NOT_CACHED = {"cache_policy": NO_CACHE, "persist_result": False}
FOLDER_CACHED = NOT_CACHED
