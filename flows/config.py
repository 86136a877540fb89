"""The typed study config: one YAML file, validated before any work, with `--set key=value` overrides.

Every private stage has the same shape: a fine-tuning `method` (compression.methods), a `train` section
(compression.train.TrainConfig) and, where a teacher guides it, `kd` (compression.losses.KDConfig).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compression.data import GLUE_TASKS, DataConfig
from compression.distill import StudentConfig
from compression.losses import KDConfig
from compression.methods import MethodConfig, get_method
from compression.methods.full import FullConfig
from compression.models import ModelConfig
from compression.pruning.masks import PruneSchedule
from compression.pruning.public_distill import PublicDistillConfig
from compression.pruning.structured import StructuredConfig
from compression.train import TrainConfig
from flows.config_file import GLUE_DIR_ENV, ConfigError, read_config
from flows.config_split import SplitSection
from privacy.config import BudgetConfig

__all__ = ["GLUE_DIR_ENV", "ConfigError", "StudyConfig", "load_config", "read_config", "study_key", "validate_config"]


class _Section(BaseModel):
    # allow_inf_nan reaches the libraries' nested dataclasses too: .inf and .nan are refused everywhere
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StageSection(_Section):
    """What every private stage has: which parameters train (`method`) and how (`train`)."""
    method: MethodConfig = FullConfig()
    train: TrainConfig = TrainConfig()


class TeacherSection(StageSection):
    """The DP teacher: the pretrained model fine-tuned on the private data."""


class PruneSection(StageSection):
    """Unstructured DPIMP: masks, then DP fine-tuning each round (optionally with KD from the DP teacher)."""
    enabled: bool = True
    schedule: PruneSchedule = PruneSchedule()
    train: TrainConfig = TrainConfig(epochs=1.0)
    kd: KDConfig = KDConfig()
    rewind: bool = False    # reset surviving weights to the DP teacher's before fine-tuning (no privacy cost)
    # chain: one line, each round prunes the previous round's model further; per_target: every sparsity of the
    # schedule is a line of its own, the DP teacher pruned to it in one round and fine-tuned on the whole share
    layout: Literal["chain", "per_target"] = "chain"
    # public text (train splits; labels unused) for Wanda scores and reconstruction, at no privacy cost: one data
    # section or a list of them; None: the private data, through a DP release before each round (`{round}_stats`)
    calibration: list[DataConfig] | None = None
    # after masking (and reconstruction), every weight trains to mimic the DP teacher on the calibration texts: no
    # private data, no privacy cost (post-processing of DP releases); then the DP fine-tuning. None: skipped
    public_distill: PublicDistillConfig | None = None

    @field_validator("method")
    @classmethod
    def _method_holds_masks(cls, method):
        if not get_method(method.name).masks:
            raise ValueError(f"method {method.name!r} cannot hold pruning masks (its merge would fill them in); "
                             "pruning rounds train with full, bitfit or bias_norm")
        return method

    @field_validator("calibration", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _public_distill_needs_texts(self):
        if self.public_distill is not None and not self.calibration:
            raise ValueError("prune.public_distill trains on public text: set prune.calibration (one or more data "
                             "sections of public text)")
        return self


class StructuredSection(StageSection):
    """Structured DPIMP: whole layers (by weight magnitude or the top ones), attention heads and FFN neurons
    (by weight magnitude) removed, DP fine-tuning after each round (optionally with KD from the DP teacher). Off by
    default."""
    enabled: bool = False
    schedule: StructuredConfig = StructuredConfig()
    train: TrainConfig = TrainConfig(epochs=1.0)
    kd: KDConfig = KDConfig()

    @field_validator("schedule")
    @classmethod
    def _data_free_scorer(cls, schedule: StructuredConfig) -> StructuredConfig:
        if schedule.scorer != "magnitude":
            raise ValueError(f"scorer {schedule.scorer!r}: a study stage scores by weight magnitude only "
                             "('taylor' needs privatised gradients, available from the library)")
        return schedule


class DistillSection(StageSection):
    """DPKD: one student (`student`) or one per initialisation in `inits`, trained with KD from the DP teacher."""
    enabled: bool = True
    student: StudentConfig = StudentConfig()
    kd: KDConfig = KDConfig(weight=0.5)
    inits: list[Literal["every_other", "pretrained", "random"]] | None = None   # several students, one each
    after: Literal["prune", "teacher"] = "prune"   # compose after the pruning rounds, or a line of its own


class NonPrivateSection(StageSection):
    """A non-private teacher baseline (epsilon = infinity): no noise; clipping at train.max_grad_norm, so set it
    large. For the results table only: never registered, never an upstream of a private model."""
    enabled: bool = False
    train: TrainConfig = TrainConfig(max_grad_norm=1e6, batch_size=32, learning_rate=0.05,
                                     encoder_learning_rate=0.05)


class FinetuneSection(_Section):
    """DP fine-tuning of the pretrained model by several methods, one line each, side by side (the DP-MemArc
    comparison): `lines` maps a line's name to its `method` and `train`. Each line starts from the pretrained model,
    not from the DP teacher; under scope "line" each composes to epsilon on its own. Off by default."""
    enabled: bool = False
    lines: dict[str, StageSection] = {}

    @field_validator("lines")
    @classmethod
    def _names(cls, lines: dict[str, StageSection]) -> dict[str, StageSection]:
        for name in lines:
            if not re.fullmatch(r"[a-z0-9_]{1,40}", name):
                raise ValueError(f"line name {name!r}: use 1-40 lower-case letters, digits and underscores")
        return lines

    @model_validator(mode="after")
    def _some_lines(self):
        if self.enabled and not self.lines:
            raise ValueError("finetune.enabled needs at least one line in finetune.lines (name: {method, train})")
        return self


class ProfileSection(_Section):
    """Training memory and step time of every stage that starts from the pretrained model (teacher, non-private
    baseline, finetune lines), measured on a fixed synthetic batch (random token ids: nothing of the private data,
    so the numbers reveal nothing about it) in a fresh process, as bench/memory.py does. Off by default."""
    enabled: bool = False
    batch_size: int = Field(32, gt=0)
    seq_len: int = Field(128, gt=1)
    steps: int = Field(2, gt=0)
    # false: measure in the study's own process (seconds instead of a fresh interpreter's start-up per model; its
    # peak then includes whatever that process holds, so only the step's own memory compares across methods)
    fresh_process: bool = True


class TrackingSection(_Section):
    uri: str | None = None  # MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite in output_dir
    experiment: str = "dpcompress"
    registered_model: str | None = None      # registry name of the final model; default "<name>-<task>"
    # the stage whose model is registered (its own epsilon is then its tag); None: the end of the chain, or with
    # several lines the best compressed model by dev metric, tagged with the union epsilon of every line compared
    register_stage: str | None = None


class ExecutionSection(_Section):
    """Where a study's independent model lines (privacy.scope: line) run: one after another in the flow's process
    (the default), or concurrently on a Dask cluster through prefect-dask: `dask`, a running scheduler's address
    (its workers need dpcompress, the data, $DPCOMPRESS_HOME and $PREFECT_API_URL), or `local_workers`, a local
    cluster of that many worker processes, each running one line at a time on `threads_per_worker` torch threads
    (workers x threads should not exceed the cores). Changes no result (not in any cache key)."""
    dask: str | None = None
    local_workers: int | None = None
    threads_per_worker: int = 1

    @model_validator(mode="after")
    def _one_cluster(self) -> ExecutionSection:
        if self.dask is not None and self.local_workers is not None:
            raise ValueError("set execution.dask (a running cluster) or execution.local_workers (a local one), "
                             "not both")
        if self.local_workers is not None and self.local_workers < 1:
            raise ValueError(f"execution.local_workers must be >= 1, got {self.local_workers}")
        if self.threads_per_worker < 1:
            raise ValueError(f"execution.threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.threads_per_worker != 1 and self.local_workers is None:
            raise ValueError("execution.threads_per_worker sets a local cluster's workers: set execution.local_workers "
                             "too (a running cluster's workers keep their own threads)")
        return self

    @property
    def concurrent(self) -> bool:
        return self.dask is not None or self.local_workers is not None


class StudyConfig(_Section):
    name: str = "study"
    output_dir: str = "runs"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    privacy: BudgetConfig = BudgetConfig()
    teacher: TeacherSection = TeacherSection()
    nonprivate: NonPrivateSection = NonPrivateSection()
    prune: PruneSection = PruneSection()
    structured: StructuredSection = StructuredSection()
    distill: DistillSection = DistillSection()
    finetune: FinetuneSection = FinetuneSection()
    profile: ProfileSection = ProfileSection()
    split: SplitSection = SplitSection()
    tracking: TrackingSection = TrackingSection()
    execution: ExecutionSection = ExecutionSection()

    @model_validator(mode="after")
    def _students_follow_one_line(self) -> StudyConfig:
        if self.prune.enabled and self.prune.layout == "per_target" and self.distill.enabled \
                and self.distill.after == "prune":
            raise ValueError("distill.after: prune needs prune.layout: chain (with per_target there is no single "
                             "pruning line to follow); set distill.after: teacher")
        return self

    @model_validator(mode="after")
    def _concurrent_lines_are_independent(self) -> StudyConfig:
        if self.execution.concurrent and self.privacy.scope != "line":
            raise ValueError("execution runs independent model lines concurrently, and with privacy.scope: study "
                             "every stage extends the ledger of the stage before it, across lines; set "
                             "privacy.scope: line, or remove execution")
        return self

    @model_validator(mode="after")
    def _pruning_starts_from_a_plain_teacher(self) -> StudyConfig:
        if self.teacher.method.name == "side" and (self.prune.enabled or self.structured.enabled):
            raise ValueError("teacher.method: side trains a side network beside a frozen backbone, which pruning "
                             "lines cannot start from; disable prune and structured, or use another method")
        return self

    @model_validator(mode="after")
    def _public_text_is_not_the_private_task(self) -> StudyConfig:
        for i, source in enumerate(self.prune.calibration or []):
            if source.task == self.data.task:
                raise ValueError(f"prune.calibration[{i}].task={source.task!r} is the private task (data.task): "
                                 "public text must be disjoint from the private data")
        return self

    @model_validator(mode="after")
    def _split_reads_public_text_and_labels(self) -> StudyConfig:
        if not self.split.enabled:
            return self
        for i, source in enumerate(self.split.attack.public):
            if source.task == self.data.task:
                raise ValueError(f"split.attack.public[{i}].task={source.task!r} is the private task (data.task): "
                                 "public text must be disjoint from the private data")
        if True in self.split.cti and GLUE_TASKS[self.data.task].is_regression:
            raise ValueError(f"split.cti: contributing tokens are scored against class labels, and data.task "
                             f"{self.data.task!r} is a regression; set split.cti: [false]")
        return self

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.study_dir / 'mlflow.db'}"


def study_key(cfg: StudyConfig) -> str:
    """The study's identity (a digest of its config): its MLflow parent run and its dataset-ledger entries. Settings
    that change no result (where it is tracked, how often checkpoints are written) are left out, as from the stages'
    keys: a stage reused under another tracking store is not charged to the dataset again."""
    def results_only(value):
        if isinstance(value, dict):
            return {k: results_only(v) for k, v in value.items() if k not in _NOT_IN_STUDY_KEY}
        return [results_only(v) for v in value] if isinstance(value, list) else value

    config = results_only(cfg.model_dump(mode="json"))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# `split`: the split branch releases nothing under the central budget (local d_chi, its own stage keys), so changing
# it must not make the dataset ledger see the study's DP stages as another study's (and reserve them again)
_NOT_IN_STUDY_KEY = frozenset({"tracking", "checkpoint_every", "execution", "split"})


def load_config(path: str | Path, overrides: list[str] = (), *, glue_dir: str | None = None) -> StudyConfig:
    """Read, override and validate a study config. A local GLUE folder may come from `glue_dir` or $DPCOMPRESS_GLUE_DIR.
    ConfigError with one line per problem, each naming the file and the key."""
    return validate_config(read_config(path, overrides, glue_dir=glue_dir), path)


def validate_config(raw: dict, path: str | Path) -> StudyConfig:
    """The typed config of the mapping `raw` (read from `path`); ConfigError listing every bad key at once, with the
    top-level sections at fault (`ConfigError.bad_sections`)."""
    problems = numbers_given_as_booleans(raw)
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as err:  # a section's own check failing on a boolean read as 1 is the same problem
        problems += [(e["loc"], _message(e)) for e in err.errors()
                     if not any(loc[:len(e["loc"])] == e["loc"] for loc, _ in problems)]
        cfg = None
    if problems:
        bad = {str(loc[0]) if loc else "" for loc, _ in problems}
        lines = [f"{path}: {'.'.join(str(p) for p in loc)}: {msg}" if loc else f"{path}: {msg}"
                 for loc, msg in problems]
        raise ConfigError(lines, bad_sections=bad)
    return cfg


def _message(error: dict) -> str:
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key; allowed here: {', '.join(sorted(_field_types(_type_at(error['loc'][:-1]))))}"
    message = error["msg"].removeprefix("Value error, ")
    shown = not isinstance(error.get("input"), (dict, list)) and "got" not in message
    return f"{message}, got {error.get('input')!r}" if shown else message


def numbers_given_as_booleans(raw: dict) -> list[tuple[tuple, str]]:
    """(key path, message) for every boolean (YAML true/false, yes/no, on/off) where the config expects a number:
    pydantic would read it as 1 or 0 (`data.max_train_examples: true` would train on one example)."""
    return _booleans(raw, [StudyConfig], ())


def _booleans(node: Any, types: list, loc: tuple) -> list[tuple[tuple, str]]:
    if isinstance(node, bool):
        members = {m for t in types for m in _members(t)}
        if members & {int, float} and bool not in members:
            return [(loc, f"expected a number, got the boolean {str(node).lower()}")]
        return []
    if isinstance(node, dict) and types and all(get_origin(m) in (list, tuple) or m is type(None)
                                                for t in types for m in _members(t)):
        node = [node]  # one section given where a list of them is expected (prune.calibration)
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [found for key, child in children for found in _booleans(child, _below(types, key), (*loc, key))]


def _members(annotation) -> list:
    """The alternatives of a type: Union and Optional members, Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _below(annotations: list, key) -> list:
    """The types one key (or list index) down from any of `annotations`."""
    found = []
    for member in (m for a in annotations for m in _members(a)):
        origin, args = get_origin(member), get_args(member)
        if origin in (list, tuple) and args:
            found.append(args[0])
        elif origin is dict and len(args) == 2:
            found.append(args[1])
        elif key in (fields := _field_types(member)):
            found.append(fields[key])
    return found


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    """Field name -> resolved type, of a pydantic model or a dataclass ({} for anything else)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {name: field.annotation for name, field in cls.model_fields.items()}
    if dataclasses.is_dataclass(cls):
        return typing.get_type_hints(cls)
    return {}


def _type_at(loc: tuple):
    """The type of the section at `loc` (a pydantic error location; a union member's tag picks that member)."""
    node: Any = StudyConfig
    for part in loc:
        fields = _field_types(node)
        if part in fields:
            node = fields[part]
        else:  # a tagged union member, e.g. `method.full`
            node = next((m for m in _members(node) if getattr(m, "name", None) == part
                         or _field_types(m).get("name") == Literal[part]), node)
        options = [m for m in _members(node) if _field_types(m)]
        node = options[0] if len(options) == 1 else node
    return node
