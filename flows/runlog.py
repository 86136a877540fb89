"""The log file of one `dpcompress run` and what reaches the console. The file (`<study>/logs/<time>.log`) keeps the
run's Python logging, library chatter and any traceback; the console shows the progress lines (Prefect's flow and
task lines, the local `dpcompress.console` lines) and, on failure, the stage, the cause, the log file and the command
that resumes. The local console lines (which may carry training losses) are never written to the file.
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# loggers that print on their own (MLflow's table creation, alembic's migrations) or chatter per request
_OWN_HANDLERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey", "uvicorn", "fastapi")
_QUIET = ("httpx", "httpcore", "urllib3", "asyncio", "filelock", "sqlalchemy", "alembic", "huey", "fsspec")
_PROGRESS = ("prefect.flow_runs", "prefect.task_runs")


def new_log_path(study_dir: Path) -> Path:
    """`<study_dir>/logs/<date>-<time>.log` (folders created)."""
    folder = study_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"{stamp}.log", 1
    while path.exists():
        path, n = folder / f"{stamp}-{n}.log", n + 1
    return path


class _Progress(logging.Filter):
    """Prefect's flow and task progress lines only: no failures (the run's own summary says what failed), no
    tracebacks, no server advice."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_PROGRESS) or record.levelno != logging.INFO or record.exc_info:
            return False
        message = record.getMessage()
        if message.startswith("View at"):  # a temporary server serves no UI
            return False
        return not message.startswith("Finished in state") or message.startswith(
            ("Finished in state Completed", "Finished in state Cached"))


@contextlib.contextmanager
def routed(log_path: Path) -> Iterator[IO[str]]:
    """Within the block, every log record goes to `log_path` (and Python warnings with them); only progress lines go
    to the console. Yields the open file (for a server's own output). Restores the logging setup on exit."""
    from prefect.logging.formatters import PrefectFormatter

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.raiseExceptions)
    owned = {name: (list(lg.handlers), lg.propagate, lg.level)
             for name in _OWN_HANDLERS + _QUIET for lg in [logging.getLogger(name)]}
    with open(log_path, "a", encoding="utf-8", buffering=1) as stream:
        to_file, console = logging.StreamHandler(stream), logging.StreamHandler(sys.stderr)
        to_file.setFormatter(_formatter(PrefectFormatter, "%Y-%m-%d %H:%M:%S"))
        console.setFormatter(_formatter(PrefectFormatter, "%H:%M:%S"))
        console.addFilter(_Progress())
        root.handlers, logging.raiseExceptions = [to_file, console], False
        root.setLevel(logging.INFO)
        for name in _OWN_HANDLERS:
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = [], True
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.captureWarnings(True)
        try:
            yield stream
        finally:
            logging.captureWarnings(False)
            root.handlers, root.level, logging.raiseExceptions = saved
            for name, (handlers, propagate, level) in owned.items():
                logger = logging.getLogger(name)
                logger.handlers, logger.propagate, logger.level = handlers, propagate, level


def _formatter(prefect_formatter, datefmt: str) -> logging.Formatter:
    """Prefect's format: a flow or task run's lines name the run."""
    head = "%(asctime)s.%(msecs)03d | %(levelname)-7s | "
    return prefect_formatter(head + "%(name)s - %(message)s", datefmt,
                             flow_run_fmt=head + "Flow run %(flow_run_name)r - %(message)s",
                             task_run_fmt=head + "Task run %(task_run_name)r - %(message)s")


def failed_stage(err: BaseException) -> str:
    """Where `err` was raised, for a person: the stage (and task) whose task function it left, else the flow."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("tasks."):  # the outermost frame in tasks/: the task
            stage, task = frame.f_locals.get("stage"), frame.f_code.co_name
            return f"stage {stage!r} (task {task})" if isinstance(stage, str) and stage else f"task {task}"
        tb = tb.tb_next
    return "the study flow"


def one_line(err: BaseException) -> str:
    """`Type: first line of the message` of `err`."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def resume_command(config: str, overrides: list[str], glue_dir: str | None) -> str:
    """The exact `dpcompress run` that resumes this study (finished stages come from the cache)."""
    parts = ["dpcompress", "run", str(Path(config).absolute())]
    parts += [item for text in overrides for item in ("--set", text)]
    parts += ["--glue-dir", str(Path(glue_dir).absolute())] if glue_dir else []
    return shlex.join(parts)
