"""The local console: progress lines that may carry values computed on private examples (training loss, batch sizes).

Its logger does not propagate, so Prefect's API handler (which ships records to the server) never sees a record,
and nothing here reaches MLflow or an exported folder. Prefect's run logger is for public facts only (stage names,
plans, epsilon spent, ETA).
"""
from __future__ import annotations

import logging
import sys

NAME = "dpcompress.console"


def console() -> logging.Logger:
    """The local-only logger (stderr of this process), set up once."""
    logger = logging.getLogger(NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | local   | %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger (its lines reach the server: public facts only), or a plain logger outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dpcompress.run")
