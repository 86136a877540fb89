"""Storage of the dataset ledger (privacy/dataset_ledger.py): the releases table, opening a store from a URL or a
path, exclusive transactions per dialect (SQLite, PostgreSQL) and stale reservations. Not here: budgets, epsilon."""
from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from .accounting import DPEvent
from .fingerprint import owner_home

LEDGER_URL_ENV = "DPCOMPRESS_LEDGER_URL"
DIALECTS = ("sqlite", "postgresql")
RESERVED, SPENT = "reserved", "spent"
NONPRIVATE = "nonprivate"  # mechanism of a release trained without DP: infinite epsilon
SQLITE_BUSY_TIMEOUT_S = 600.0  # how long a writer waits for another process's exclusive transaction
# One key for pg_advisory_xact_lock, the same in every process and on every host.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"dpcompress.dataset_ledger").digest()[:8], "big", signed=True)
_EXCLUSIVE = "dpcompress_exclusive"  # execution option read by the SQLite "begin" hook

metadata = sa.MetaData()
releases = sa.Table(
    "dpcompress_releases", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dataset", sa.Text, nullable=False, index=True),
    sa.Column("study", sa.Text, nullable=False),
    sa.Column("study_key", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False, index=True),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("stage_key", sa.Text, nullable=False, default=""),
    sa.Column("noise_multiplier", sa.Float, nullable=True),  # NULL for a non-private release
    sa.Column("sample_rate", sa.Float, nullable=True),
    sa.Column("num_steps", sa.Integer, nullable=True),
    sa.Column("mechanism", sa.Text, nullable=False),
    sa.Column("max_grad_norm", sa.Float, nullable=True),  # NULL while reserved
    sa.Column("delta", sa.Float, nullable=True),
    sa.Column("accountant", sa.Text, nullable=False),
    sa.Column("noise", sa.Text, nullable=False),  # "" while reserved
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("spent_at", sa.Text, nullable=True),
    # a release that enters no composition (privacy.dataset_ledger.record_uncomposed): its parameter (dx: eta, per
    # unit of L2 distance) and what it does guarantee, in words; NULL for a central DP release
    sa.Column("eta", sa.Float, nullable=True),
    sa.Column("guarantee", sa.Text, nullable=True),
)
ADDED_COLUMNS = ("eta", "guarantee")  # added to the table after its first version: a ledger created before gains them


@dataclass(frozen=True, kw_only=True)
class Release:
    """One row of the ledger: a release (status "spent") or a reservation for one (status "reserved").

    noise_multiplier, sample_rate, num_steps: the release's `DPEvent` (None for a non-private one).
    delta, accountant: those of the study that recorded it. created_at, spent_at: UTC ISO timestamps
    (created_at is renewed when the stage begins; spent_at is None while reserved).
    """

    id: int
    dataset: str
    study: str
    study_key: str
    run_id: str
    stage: str
    stage_key: str
    noise_multiplier: float | None
    sample_rate: float | None
    num_steps: int | None
    mechanism: str
    max_grad_norm: float | None
    delta: float | None
    accountant: str
    noise: str
    status: str
    owner: str
    created_at: str
    spent_at: str | None
    eta: float | None = None
    guarantee: str | None = None

    @property
    def event(self) -> DPEvent | None:
        """The release's DP event; None for a release that enters no composition: non-private, or under a guarantee of
        another kind (a mechanism registered with composes=False, e.g. dx: a local guarantee per token
        representation)."""
        if self.mechanism == NONPRIVATE or not composes(self.mechanism):
            return None
        return DPEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                       num_steps=self.num_steps)


def default_ledger_url() -> str:
    """$DPCOMPRESS_LEDGER_URL if set, else SQLite at $DPCOMPRESS_HOME/ledger.db ($DPCOMPRESS_HOME: ~/.dpcompress)."""
    if os.environ.get(LEDGER_URL_ENV):
        return os.environ[LEDGER_URL_ENV]
    return f"sqlite:///{owner_home().expanduser() / 'ledger.db'}"


def resolve_url(url: str | os.PathLike) -> sa.URL:
    """A SQLAlchemy URL from a URL or a plain filesystem path (a SQLite file there); ValueError if neither."""
    text = os.fspath(url)
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser().absolute()))
    try:
        parsed = sa.make_url(text)
    except sa.exc.ArgumentError:
        raise ValueError(f"not a database URL or path: {text!r}") from None
    if parsed.get_backend_name() not in DIALECTS:
        raise ValueError(f"unsupported ledger database {parsed.get_backend_name()!r}; supported: {DIALECTS}")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ValueError("an in-memory SQLite ledger would forget every release; give a file")
    return parsed


def open_engine(url: sa.URL, *, create: bool) -> sa.Engine:
    """An engine for `url`. SQLite: the file is created (mode 0600, parent folders too) if `create`, else
    FileNotFoundError if missing. ValueError if the URL names a driver that is not installed."""
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # never truncates an existing ledger
        elif not path.is_file():
            raise FileNotFoundError(f"no dataset ledger at {path}")
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        _emit_own_begin(engine)
        return engine
    try:
        return sa.create_engine(url)
    except (ImportError, sa.exc.NoSuchModuleError) as err:
        raise ValueError(f"cannot open ledger {url.render_as_string(hide_password=True)}: {err}") from None


def _emit_own_begin(engine: sa.Engine) -> None:
    """SQLAlchemy's pysqlite recipe: the driver emits no BEGIN of its own; we emit BEGIN IMMEDIATE (the write
    lock, taken before the first read) for exclusive transactions and a plain BEGIN for reads."""

    @sa.event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        exclusive = conn.get_execution_options().get(_EXCLUSIVE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if exclusive else "BEGIN")


@contextmanager
def transaction(engine: sa.Engine, *, exclusive: bool) -> Iterator[sa.Connection]:
    """A transaction, committed on exit. `exclusive`: no other exclusive transaction on the same store runs
    until this one ends (SQLite: BEGIN IMMEDIATE; PostgreSQL: pg_advisory_xact_lock on PG_LOCK_KEY)."""
    with engine.connect() as conn:
        conn.execution_options(**{_EXCLUSIVE: exclusive})
        with conn.begin():
            if exclusive and engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn


def create_schema(engine: sa.Engine) -> None:
    """Create the releases table if missing, and add the columns of ADDED_COLUMNS to a table created before them (its
    rows get NULL: central DP releases), inside an exclusive transaction (two first users do not race)."""
    with transaction(engine, exclusive=True) as conn:
        metadata.create_all(conn)
        _add_missing_columns(conn)


def upgrade_schema(engine: sa.Engine) -> None:
    """For a store opened without `create`: add ADDED_COLUMNS to an existing releases table created before them (a
    ledger written by an earlier version stays readable by `budget spent` and the pre-flight); nothing else is
    created, and a store without the table is left as it is."""
    if not sa.inspect(engine).has_table(releases.name):
        return
    if set(ADDED_COLUMNS) <= {column["name"] for column in sa.inspect(engine).get_columns(releases.name)}:
        return
    with transaction(engine, exclusive=True) as conn:
        _add_missing_columns(conn)


def _add_missing_columns(conn: sa.Connection) -> None:
    present = {column["name"] for column in sa.inspect(conn).get_columns(releases.name)}
    for name in ADDED_COLUMNS:
        if name not in present:
            kind = releases.c[name].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {releases.name} ADD COLUMN {name} {kind}"))


def composes(mechanism: str) -> bool:
    """Whether releases of `mechanism` enter the dataset's (epsilon, delta) composition: a registered mechanism's
    `composes` (privacy.mechanisms); an unknown name is treated as composing (counted, the safe side)."""
    from .mechanisms import MECHANISMS

    known = MECHANISMS.get(mechanism)
    return known is None or known.composes


def select_rows(conn: sa.Connection, *conditions) -> list[Release]:
    query = sa.select(releases).where(*conditions).order_by(releases.c.spent_at, releases.c.id)
    return [Release(**row._mapping) for row in conn.execute(query)]


def owner() -> str:
    """This process as a reservation owner: host:pid, where host is the host name and, on Linux, the pid namespace
    (two containers with one host name do not see each other's pids)."""
    return f"{_host()}:{os.getpid()}"


def _host() -> str:
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def is_stale(row: Release, *, now: datetime, ttl_s: float) -> bool:
    """A reservation is stale when it is older than `ttl_s` seconds, or its owner is a process on this host (and pid
    namespace) that is no longer alive (a pid reused since then keeps it until the TTL: the safe side)."""
    if (now - datetime.fromisoformat(row.created_at)).total_seconds() > ttl_s:
        return True
    host, _, pid = row.owner.rpartition(":")
    return host == _host() and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
