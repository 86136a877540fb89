"""Prefect task: register the study's released model in the MLflow registry, tagged with what its epsilon means."""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from prefect import task

from compression.models import load_saved
from privacy.ledger import Ledger, union_epsilon
from tasks import tracking
from tasks.caching import NOT_CACHED
from tasks.refs import EvalRef, ModelRef

_PACKAGES = Path(__file__).resolve().parents[1]
TEACHERS = ("teacher", "nonprivate_teacher")


def choose_release(models: list[ModelRef], evaluations: list[EvalRef], *, scope: str,
                   register_stage: str | None) -> tuple[ModelRef, list[ModelRef] | None]:
    """(the model to register, the models compared to choose it, or None). `register_stage` names it up front; else
    the last one (scope "study": the end of the chain, whose ledger holds the whole study); with several lines (scope
    "line"), the compressed private model with the best dev metric (higher is better): the choice then depends on
    every compressed model, so all of them are compared (their union epsilon is its tag)."""
    if register_stage is not None:
        named = [m for m in models if m.stage == register_stage]
        if not named:
            raise ValueError(f"tracking.register_stage={register_stage!r} is not a stage of this study; "
                             f"stages: {[m.stage for m in models]}")
        return named[0], None
    compressed = [(e.results["metric"], i) for i, (m, e) in enumerate(zip(models, evaluations))
                  if m.stage not in TEACHERS]
    if scope == "study" or len(models) < 3 or not compressed:
        return models[-1], None
    return models[max(compressed)[1]], [models[i] for _, i in compressed]


@task(name="register_model", **NOT_CACHED)
def register_final(*, models: list[ModelRef], evaluations: list[EvalRef], scope: str, register_stage: str | None,
                   name: str, task_name: str, tracking_uri: str) -> str:
    """Log the released model (`choose_release`) and register it, tagged with what its epsilon means: with a
    selection, the union of every model compared. Models trained with seeded noise get no epsilon tag."""
    model, compared = choose_release(models, evaluations, scope=scope, register_stage=register_stage)
    net, _ = load_saved(model.path)
    ledgers = [Ledger.load(m.ledger_path) for m in (compared or [model])]
    last = ledgers[-1].entries[-1]
    noise = "seeded" if not all(ledger.has_guarantee for ledger in ledgers) else last.noise
    epsilon = union_epsilon(ledgers, delta=model.delta, accountant=last.accountant)
    scope_text = (f"union of the {len(ledgers)} models compared to select it" if compared else "its own ledger")
    tags = {**tracking.guarantee_tags(epsilon=epsilon, delta=model.delta, accountant=last.accountant, noise=noise),
            "epsilon_scope": scope_text, "stage": model.stage, "task": task_name, "model_sha256": model.sha256}
    if version := tracking.registered_version(uri=tracking_uri, name=name, tags=tags):
        return version  # this store has it already (a rerun): once per model and store, checked in the store itself
    requirements = [f"{p}=={md.version(p)}" for p in ("torch", "transformers")]
    return tracking.register_model(uri=tracking_uri, run_id=model.run_id, model=net, name=name, tags=tags,
                                   pip_requirements=requirements, code_paths=[str(_PACKAGES / "compression")])
