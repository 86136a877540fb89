"""Pre-flight checks of the places a study reads and writes: the model folder (or hub name) and its family, the
output folder, the MLflow tracking store, the Prefect API. Each check returns one line per problem, naming the field;
none writes anything or waits more than a few seconds.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

REACH_TIMEOUT_S = 3.0  # one try: an unreachable server is reported, not retried for minutes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def check_model(name: str, field: str) -> list[str]:
    """`name` is a model folder, the bundled alias or a hub model in the local cache (or on a reachable hub), with a
    tokenizer and a config.json whose model_type has a registered family (compression.families)."""
    from compression.models import resolve_model_path

    try:
        path = Path(resolve_model_path(name)).expanduser()
    except ImportError as err:
        return [f"{field}={name!r}: the bundled model needs its package ({err})"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"{field}={name!r}: {path} has no config.json: not a Hugging Face model folder"]
        if not any((path / file).is_file() for file in TOKENIZER_FILES):
            return [f"{field}={name!r}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})"]
        return _check_family(path / "config.json", name, field)
    if path.exists():
        return [f"{field}={name!r}: {path} is a file, not a model folder"]
    config, why = _hub_config(name)
    return _check_family(config, name, field) if config else [f"{field}={name!r}: {why}"]


def model_depth(name: str) -> int | None:
    """The number of encoder blocks of model `name` from its config.json (a local folder, the bundled model or the
    hub cache); None where that is unknown (pre-flight's other checks report why)."""
    from compression.models import resolve_model_path

    try:
        path = Path(resolve_model_path(name)).expanduser()
        config = path / "config.json" if path.is_dir() else _hub_config(name)[0]
        values = json.loads(Path(config).read_text()) if config else {}
    except (ImportError, OSError, ValueError):
        return None
    depth = next((values[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if k in values), None)
    return depth if isinstance(depth, int) else None


def _hub_config(name: str) -> tuple[Path | None, str]:
    """The config.json of hub model `name` from the local cache, or the hub if online; else (None, why not)."""
    from huggingface_hub import hf_hub_download, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    missing = f"no folder {Path(name).expanduser().absolute()}"
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        return None, f"{missing} (nor a Hugging Face hub model name)"
    if isinstance(cached, str):
        return Path(cached), ""
    if is_offline_mode():
        return None, f"{missing}, and no hub model of that name in the local cache (HF_HUB_OFFLINE is set)"
    try:
        return Path(hf_hub_download(name, "config.json", etag_timeout=REACH_TIMEOUT_S)), ""
    except Exception as err:  # (any hub failure is the same answer: not available)
        return None, f"{missing}, and the hub has no such model ({str(err).splitlines()[0]})"


def _check_family(config: Path, name: str, field: str) -> list[str]:
    from compression.families import FAMILIES

    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as err:
        return [f"{field}={name!r}: {config} is not a readable JSON config ({err})"]
    if model_type not in FAMILIES:
        return [(f"{field}={name!r}: model_type {model_type!r} has no registered family; supported: "
                f"{', '.join(sorted(FAMILIES))} (compression.families)")]
    return []


def check_output(output_dir: str, study_dir: Path) -> list[str]:
    """The study folder is a folder, or can be made one: nothing on its way is a file, and the deepest existing
    folder is writable. Nothing is created here."""
    from tasks.lock import holder

    why = unwritable(study_dir)
    if not why and (running := holder(study_dir)):
        why = f"study folder {study_dir} is in use by {running}: one run of a study at a time (wait for it, or stop it)"
    return [f"output_dir={output_dir!r}: {why}"] if why else []


def unwritable(path: Path) -> str | None:
    """Why folder `path` could not be created or written to (None: it can)."""
    path = path.expanduser().absolute()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    return None


def check_tracking(uri: str, field: str) -> list[str]:
    """MLflow 3 takes a database or a server: a `file:` or plain-path store is refused (sqlite:///... instead); a
    sqlite file's folder must be writable; an http(s) server must answer within REACH_TIMEOUT_S."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    if uri.split(":")[0] in ("databricks", "databricks-uc"):  # a hosted store, named without a URL
        return []
    if scheme in ("", "file") or len(scheme) == 1:  # a path (one letter: a Windows drive)
        path = Path(uri.removeprefix("file://")).expanduser().absolute()
        return [(f"{field}={uri!r}: a file store, which MLflow 3 refuses; use a database, e.g. "
                f"sqlite:///{path}/mlflow.db, or an http(s) tracking server")]
    if scheme == "sqlite":
        database = uri.split("?")[0].removeprefix("sqlite:///")
        if database in ("", "sqlite://", ":memory:"):
            return [(f"{field}={uri!r}: an in-memory database would lose every run; give a file, "
                    "e.g. sqlite:///runs/mlflow.db")]
        path = Path(database)
        why = "a folder, not a database file" if path.is_dir() else unwritable(path.absolute().parent)
        return [f"{field}={uri!r}: {why}"] if why else []
    if scheme in ("http", "https"):
        why = unreachable(uri.rstrip("/") + "/health")
        return [f"{field}={uri!r}: {why}; start the tracking server (mlflow server) or fix the URI"] if why else []
    if scheme in DATABASE_PORTS:  # a database server: its port must accept a connection
        shown = f"{parts.scheme}://{parts.hostname or 'localhost'}{parts.path}"  # never the password
        why = closed(parts.hostname or "localhost", parts.port or DATABASE_PORTS[scheme])
        return [f"{field}={shown!r}: {why}; start the database or fix the URI"] if why else []
    return []


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def closed(host: str, port: int, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why nothing accepted a TCP connection to host:port within `timeout_s` (one try); None if something did."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"no connection to {host}:{port} within {timeout_s:g} s ({err.strerror or err})"
    return None


def check_prefect_api(url: str | None) -> list[str]:
    """A configured Prefect API (PREFECT_API_URL) must answer; None: a temporary server will be started."""
    if not url:
        return []
    why = unreachable(url.rstrip("/") + "/health")
    return [(f"PREFECT_API_URL={url!r}: {why}; start it (prefect server start) or unset PREFECT_API_URL to use a "
            "temporary server")] if why else []


def unreachable(url: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why `url` gave no HTTP answer within `timeout_s` (one try); None if it answered (any status)."""
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as err:
        return f"no answer within {timeout_s:g} s ({err.reason})"
    except (OSError, ValueError) as err:
        return f"no answer within {timeout_s:g} s ({err})"
    return None
