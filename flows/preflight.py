"""Pre-flight: every problem a study would run into, found at once and within seconds, before any server starts or
anything is written: the config file, the data files (private task, public calibration and attack text), the model,
the output folder, the tracking store, the Prefect API and the privacy budget. One line per problem, naming the field
or file (and data row). `dpcompress run` and `dpcompress budget plan` run it first and exit 2 on any problem.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows import preflight_io as io
from flows.config_file import GLUE_DIR_ENV, ConfigError, read_config

if TYPE_CHECKING:  # the libraries take seconds to import: a config that cannot be read is reported without them
    from compression.data import DataConfig, Split
    from flows.config import StudyConfig


@dataclass
class Preflight:
    """What pre-flight found: the typed config (None if unusable), one line per problem, the number of private
    training examples, and the value `plan` computed (with a time limit) when everything else passed."""

    config: StudyConfig | None
    problems: list[str] = field(default_factory=list)
    num_train: int | None = None
    plan: Any = None


def preflight(config_path: str | Path, overrides: list[str] = (), *, glue_dir: str | None = None,
              for_run: bool = True, plan: Callable[[StudyConfig, int], Any] | None = None) -> Preflight:
    """Check the study `config_path` (with `overrides` and `glue_dir`, as `dpcompress run` takes them).

    for_run: also check what only a run needs (the model, output folder, tracking store, Prefect API). plan:
    `(config, num_train) -> value`, computed under a time limit once every other check passed (default: the study's
    privacy plan); the dataset's lifetime budget is then checked against that plan."""
    try:
        raw = read_config(config_path, list(overrides), glue_dir=glue_dir)
    except ConfigError as err:
        return Preflight(None, err.problems)
    from compression.data import subsample_task
    from flows.config import validate_config

    problems, bad = [], set()
    try:
        cfg = validate_config(raw, config_path)
    except ConfigError as err:  # go on with the sections that are right: all problems are reported at once
        problems, bad = err.problems, err.bad_sections
        cfg = _usable_part(raw, bad)
    if cfg is None:
        return Preflight(None, problems)
    splits, found = _check_sources(cfg, bad)
    problems += found
    if for_run:
        problems += _check_places(cfg, bad)
    num_train = len(subsample_task(cfg.data, *splits["data"])[0]) if "data" in splits else None
    if bad or num_train is None:
        return Preflight(None, problems, num_train)
    from flows import preflight_budget as budget  # the accountants take seconds to import

    problems += budget.check_budget(cfg, num_train)
    if problems:  # the full plan takes up to a minute: only once everything else is right
        return Preflight(cfg, problems, num_train)
    from flows.plan import plan_study

    budgets, problems = budget.bounded_plan(cfg, num_train, plan_study)
    value = budgets
    if not problems and plan is not None:
        value, problems = budget.bounded_plan(cfg, num_train, plan)  # memoised accounting: the same plan is free
    if not problems:
        problems = budget.check_dataset_budget(cfg, budgets, splits["data"][0])
    return Preflight(cfg, problems, num_train, value)


def _usable_part(raw: dict, bad: set[str]) -> StudyConfig | None:
    """The config with its bad sections left at their defaults, so that the checks of the good ones still run; None
    without a usable data section. A check of two sections at once (key "") leaves out the stage sections."""
    from pydantic import ValidationError

    from flows.config import StudyConfig

    drop = bad | ({"prune", "distill", "structured"} if "" in bad else set())
    if "data" in drop:
        return None
    try:
        return StudyConfig.model_validate({k: v for k, v in raw.items() if k not in drop})
    except (ValidationError, ValueError):
        return None


def _check_sources(cfg: StudyConfig, bad: set[str]) -> tuple[dict[str, tuple[Split, Split]], list[str]]:
    """Every data source the study reads, loaded whole: ({key: (train, dev)} of those that load, problems)."""
    sources = {} if "data" in bad else {"data": cfg.data}
    if "prune" not in bad and cfg.prune.enabled:
        sources |= {f"prune.calibration.{i}": s for i, s in enumerate(cfg.prune.calibration or [])}
    if "split" not in bad and cfg.split.enabled:
        from flows.config_split import public_sources

        sources |= {f"split.attack.public.{i}": s for i, s in enumerate(public_sources(cfg.split, cfg.data))}
    splits, problems = {}, []
    for key, source in sources.items():
        loaded, found = check_data(source, key)
        problems += found
        if loaded is not None:
            splits[key] = loaded
    return splits, problems


def check_data(cfg: DataConfig, key: str) -> tuple[tuple[Split, Split] | None, list[str]]:
    """(train, dev) of one data source, whole, or (None, one line per problem): the GLUE folder and the task's
    folder exist; each split's file is UTF-8, parses as the task's TSV, has its columns, rows and valid labels."""
    from compression.data import GLUE_TASKS, HF_DATASET, load_split

    spec = GLUE_TASKS[cfg.task]
    if cfg.dir is not None:
        root = Path(cfg.dir)
        if not root.is_dir():
            return None, [f"{key}.dir={cfg.dir!r}: no such folder (a GLUE folder holding SST-2/, CoLA/, ...)"]
        if not (root / spec.folder).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            return None, [f"{key}.dir={cfg.dir!r}: no {spec.folder}/ folder for task {cfg.task!r} (it has {found})"]
    loaded, problems = {}, []
    for split in ("train", "dev"):
        try:
            loaded[split] = load_split(spec, data_dir=cfg.dir, split=split)
        except (ValueError, OSError) as err:
            problems.append(f"{key}: {str(err).splitlines()[0]}")
        except Exception as err:  # (the hub's errors vary: offline, not found, network)
            problems.append(f"{key}: {cfg.task} from the Hugging Face hub ({HF_DATASET}): {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}; set {key}.dir, --glue-dir or "
                            f"${GLUE_DIR_ENV} to a local GLUE folder")
        if problems and cfg.dir is None:
            break  # the hub fails the same way for both splits
    return (None if problems else (loaded["train"], loaded["dev"])), problems


def _check_places(cfg: StudyConfig, bad: set[str]) -> list[str]:
    """The model(s) to load, the output folder, the tracking store and the Prefect API."""
    problems = [] if "model" in bad else io.check_model(cfg.model.name_or_path, "model.name_or_path")
    student = cfg.distill.student
    if "distill" not in bad and cfg.distill.enabled and student.pretrained \
            and "pretrained" in (cfg.distill.inits or [student.init]):
        problems += io.check_model(student.pretrained, "distill.student.pretrained")
    if not bad & {"model", "split"} and cfg.split.enabled and not problems:
        depth = io.model_depth(cfg.model.name_or_path)
        if depth is not None and max(cfg.split.splits) > depth:
            problems.append(f"split.splits={cfg.split.splits}: the model has {depth} blocks "
                            f"({cfg.model.name_or_path}); the customer holds at most all of them")
        elif depth is not None and depth in cfg.split.splits and cfg.split.method.name == "lora":
            problems.append(f"split.splits: a split at {depth} (every block) leaves the vendor no block for "
                            "split.method lora; use method full (the head alone), or a smaller split")
    if not bad & {"name", "output_dir"}:
        problems += io.check_output(cfg.output_dir, cfg.study_dir)
    if not bad & {"name", "output_dir", "tracking"}:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if cfg.tracking.uri or env:
            problems += io.check_tracking(cfg.tracking_uri(), "tracking.uri" if cfg.tracking.uri else
                                          "$MLFLOW_TRACKING_URI")
    # a URL from a Prefect profile is checked when the run starts (flows.server): importing prefect takes seconds
    return problems + io.check_prefect_api(os.environ.get("PREFECT_API_URL"))
