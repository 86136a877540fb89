"""Prefect's temporary API server for one `dpcompress run` without PREFECT_API_URL: the server Prefect itself would
start (same app, same settings), but in its own session, so that Ctrl-C in the terminal reaches the run and not the
server. Prefect's own temporary server dies with the first Ctrl-C, and the run's last state updates then retry against
it for minutes. Its start-up gets a timeout that survives a busy machine, and a one-line error if it still fails.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO

from flows.preflight_io import unreachable

TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's own setting, honoured when set
STARTUP_TIMEOUT_S = 180  # Prefect's default (20 s) is too short on a busy 2-core machine (16 s measured idle)
STOP_TIMEOUT_S = 10


class ServerError(RuntimeError):
    """The temporary server did not start; the message says what to do instead (one line)."""


def startup_timeout_problems() -> list[str]:
    """One line if $PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS is set but not a whole number of seconds > 0,
    else none: Prefect reads it as an integer when it is imported, and any other value stops it there with a
    traceback."""
    import pydantic

    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return []
    try:
        if pydantic.TypeAdapter(int).validate_python(text) > 0:  # what Prefect accepts: "20", " 20 ", "20.0"
            return []
    except pydantic.ValidationError:
        pass
    return [(f"${TIMEOUT_ENV}={text!r}: not a whole number of seconds > 0 (Prefect reads it as an integer); set it "
             f"to one, or unset it for {STARTUP_TIMEOUT_S} s")]


@contextlib.contextmanager
def prefect_api(output: IO[str] | None = None) -> Iterator[str]:
    """The Prefect API to run against: PREFECT_API_URL if set, else a temporary server (its output to `output`),
    stopped on exit. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:  # the user's server (from the environment or a Prefect profile)
        if why := unreachable(settings.api.url.rstrip("/") + "/health"):
            raise ServerError(f"PREFECT_API_URL={settings.api.url!r}: {why}; start it (prefect server start) or "
                              "unset PREFECT_API_URL to use a temporary server")
        yield settings.api.url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    process = subprocess.Popen(_command(port), env=_environment(settings), stdout=output or subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_until_healthy(process, url, float(os.environ.get(TIMEOUT_ENV, STARTUP_TIMEOUT_S)))
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drain_prefect_workers() -> None:
    """Send the log lines and events still queued before the server stops (else they retry against it at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # a worker that cannot send loses its lines, as at any exit
            worker.drain_all(timeout=5)


def _command(port: int) -> list[str]:
    """What Prefect's SubprocessASGIServer runs (prefect.server.api.server, Prefect 3.8)."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
            "error", "--lifespan", "on"]


def _environment(settings) -> dict[str, str]:
    return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True)}


def _die_with_parent() -> None:
    """In the server's process, before it starts: ask Linux to SIGTERM it when its parent dies (a `kill -9` of
    `dpcompress run` would otherwise orphan it, since it runs in a session of its own). Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"the temporary Prefect server exited with code {process.returncode} while starting "
                              f"(its output is in the log file); {_ADVICE}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise ServerError(f"the temporary Prefect server did not answer within {timeout_s:g} s (a busy machine? raise "
                      f"${TIMEOUT_ENV}); {_ADVICE}")


_ADVICE = ("or run one yourself: `prefect server start` in another shell, then "
           "PREFECT_API_URL=http://127.0.0.1:4200/api dpcompress run ...")
