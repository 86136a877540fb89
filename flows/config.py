"""The typed study config: one YAML file, validated before any work, with `--set key=value` overrides.

Every private stage has the same shape: a fine-tuning `method` (compression.methods), a `train` section
(compression.train.TrainConfig) and, where a teacher guides it, `kd` (compression.losses.KDConfig).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from compression.data import DataConfig
from compression.distill import StudentConfig
from compression.losses import KDConfig
from compression.methods import MethodConfig, get_method
from compression.methods.full import FullConfig
from compression.models import ModelConfig
from compression.pruning.masks import PruneSchedule
from compression.pruning.public_distill import PublicDistillConfig
from compression.pruning.structured import StructuredConfig
from compression.train import TrainConfig
from flows.renamed import renamed_keys
from privacy.config import BudgetConfig

GLUE_DIR_ENV = "DPCOMPRESS_GLUE_DIR"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TrackingSection(_Section):
    uri: str | None = None  # MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite in output_dir
    experiment: str = "dpcompress"
    registered_model: str | None = None      # registry name of the final model; default "<name>-<task>"
    # the stage whose model is registered (its own epsilon is then its tag); None: the end of the chain, or with
    # several lines the best compressed model by dev metric, tagged with the union epsilon of every line compared
    register_stage: str | None = None


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
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _students_follow_one_line(self) -> StudyConfig:
        if self.prune.enabled and self.prune.layout == "per_target" and self.distill.enabled \
                and self.distill.after == "prune":
            raise ValueError("distill.after: prune needs prune.layout: chain (with per_target there is no single "
                             "pruning line to follow); set distill.after: teacher")
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

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.study_dir / 'mlflow.db'}"


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set needs KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = (), *, glue_dir: str | None = None) -> StudyConfig:
    """Read, override and validate a study config. A local GLUE folder may come from `glue_dir` or
    $DPCOMPRESS_GLUE_DIR."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides))
    if moved := renamed_keys(raw):
        raise ConfigError(f"{path}: keys of an older dpcompress\n" + "\n".join(f"  {line}" for line in moved))
    glue_dir = glue_dir or os.environ.get(GLUE_DIR_ENV)
    if glue_dir and isinstance(raw.get("data"), dict) and not raw["data"].get("dir"):
        raw["data"]["dir"] = str(Path(glue_dir).resolve())
    calibration = raw.get("prune", {}).get("calibration") if isinstance(raw.get("prune"), dict) else None
    for source in [calibration] if isinstance(calibration, dict) else calibration or []:
        if glue_dir and isinstance(source, dict) and not source.get("dir"):
            source["dir"] = str(Path(glue_dir).resolve())
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: invalid config\n{format_errors(err)}") from None


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = f"unknown key; allowed here: {', '.join(_allowed_keys(e['loc'][:-1]))}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    node: Any = StudyConfig
    for part in loc:
        fields = getattr(node, "model_fields", None) or getattr(node, "__dataclass_fields__", {})
        field = fields.get(part)
        node = getattr(field, "annotation", None) or getattr(field, "type", None)
    fields = getattr(node, "model_fields", None) or getattr(node, "__dataclass_fields__", {})
    return sorted(fields)
