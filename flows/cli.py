"""The `dpcompress` command: run a study from its YAML config and print the summary table."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from flows import runlog
from flows.budget_cli import add_budget_parser
from flows.config_file import GLUE_DIR_ENV, ConfigError
from flows.preflight import preflight
from flows.server import ServerError, prefect_api, startup_timeout_problems
from flows.tables import format_table
from tasks.lock import StudyLockedError


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registering downloads the model once
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry writes race on sqlite
    import opacus.utils.module_utils  # noqa: F401  (calls logging.basicConfig on import)
    import transformers

    logging.getLogger().handlers.clear()  # flows.runlog routes the run's log lines
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _problems(lines: list[str]) -> int:
    for line in lines:
        print(f"dpcompress: {line}", file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    """Pre-flight (exit 2 with one line per problem), then the study flow (exit 1 with the failed stage, its cause,
    the log file and the command that resumes; 130 on Ctrl-C), then the results table."""
    checked = preflight(args.config, args.set, glue_dir=args.glue_dir, for_run=True)
    if problems := checked.problems + startup_timeout_problems():  # the latter stops Prefect's import otherwise
        return _problems(problems)
    cfg = checked.config
    _quiet_libraries()
    from flows.study import study  # imports Prefect and MLflow, which set up their logging: route it after

    log_path = runlog.new_log_path(cfg.study_dir)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `timeout`, `docker stop`: the same clean exit as Ctrl-C
    print(f"study {cfg.name!r}: output in {cfg.study_dir}, tracking at {cfg.tracking_uri()}, log in {log_path}")
    with runlog.routed(log_path) as log_file:
        try:
            with prefect_api(log_file):
                rows = study(config_path=str(args.config), overrides=args.set, glue_dir=args.glue_dir)
        except KeyboardInterrupt:
            print(f"dpcompress: interrupted; finished stages are kept (log: {log_path}); resume with: "
                  f"{_resume(args)}", file=sys.stderr)
            return 130
        except Exception as err:  # (any failure after start: summarised, its traceback in the log)
            return _failed(err, log_path, args)
    print()
    print(format_table(rows))
    footer = cfg.study_dir / "results" / "footer.txt"
    budget = "per model line" if cfg.privacy.scope == "line" else "for the whole study"
    print(f"\n{footer.read_text() if footer.exists() else ''} Budget: epsilon={cfg.privacy.epsilon:g} {budget}.")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _resume(args) -> str:
    return runlog.resume_command(args.config, args.set, args.glue_dir)


def _failed(err: Exception, log_path, args) -> int:
    """A run that failed after it started: the stage and the one-line cause, the log file with the traceback, and the
    command that resumes."""
    if isinstance(err, ServerError | StudyLockedError):  # one line that says what to do: no stage, nothing to resume
        print(f"dpcompress: {err}", file=sys.stderr)
        return 1
    logging.getLogger("dpcompress.run").error("the study failed", exc_info=err)
    print(f"dpcompress: {runlog.failed_stage(err)} failed: {runlog.one_line(err)}\n"
          f"dpcompress: full traceback in {log_path}\n"
          f"dpcompress: to resume (finished stages are reused): {_resume(args)}", file=sys.stderr)
    return 1


def cmd_report(args) -> int:
    """Print a finished study's results table (Markdown) from the tracking server."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tasks.tracking import fetch_results

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.config:
        from flows.config import load_config

        try:
            uri = uri or load_config(args.config).tracking_uri()
        except (ConfigError, ValueError) as err:
            print(f"dpcompress: {err}", file=sys.stderr)
            return 2
    if not uri:
        print("dpcompress: report needs --tracking-uri, $MLFLOW_TRACKING_URI or --config", file=sys.stderr)
        return 2
    try:
        print(fetch_results(uri=uri, run_id=args.run_id, name="results.csv" if args.csv else "results.md"))
    except LookupError as err:
        print(f"dpcompress: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a study; finished stages are reused from the cache")
    run.add_argument("config", help="study YAML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set privacy.epsilon=4 (repeatable)")
    run.add_argument("--glue-dir", default=None,
                     help=f"local GLUE folder (SST-2/, CoLA/, ...) when data.dir is unset; or ${GLUE_DIR_ENV}")
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="print a finished study's results table from the tracking server")
    report.add_argument("run_id", help="the study's MLflow run id (the parent run)")
    report.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else --config's store")
    report.add_argument("--config", default=None, help="study YAML whose tracking store to read")
    report.add_argument("--csv", action="store_true", help="print the CSV instead of the Markdown table")
    report.set_defaults(func=cmd_report)
    add_budget_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before a run starts (pre-flight, planning): nothing to resume
        print("dpcompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
