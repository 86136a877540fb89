"""Prefect task: register the study's released model in the MLflow registry, tagged with what its epsilon means."""
from __future__ import annotations

import importlib.metadata as md

from prefect import task

from compression.data import GLUE_TASKS
from privacy.ledger import Ledger, union_epsilon
from tasks import tracking
from tasks.caching import NOT_CACHED
from tasks.evaluation import export_folder
from tasks.refs import EvalRef, ModelRef

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
    """Log the released model (`choose_release`) as its exported HF folder, served by tasks/serving.py, register it
    tagged and described with what its epsilon means (with a selection: the union of every model compared; models
    trained with seeded noise get no epsilon tag), and make it the `champion`."""
    model, compared = choose_release(models, evaluations, scope=scope, register_stage=register_stage)
    ledgers = [Ledger.load(m.ledger_path) for m in (compared or [model])]
    last = ledgers[-1].entries[-1]
    noise = "seeded" if not all(ledger.has_guarantee for ledger in ledgers) else last.noise
    epsilon = union_epsilon(ledgers, delta=model.delta, accountant=last.accountant)
    scope_text = (f"union of the {len(ledgers)} models compared to select it" if compared else "its own ledger")
    guarantee = {"epsilon": epsilon, "delta": model.delta, "accountant": last.accountant, "noise": noise}
    tags = {**tracking.guarantee_tags(**guarantee), "epsilon_scope": scope_text, "stage": model.stage,
            "task": task_name, "model_sha256": model.sha256, **tracking.MODEL_FORMAT}
    description = (f"{tracking.guarantee_text(**guarantee)} Epsilon scope: {scope_text}. "
                   f"{_what_it_does(model.stage, task_name)}")
    version = tracking.registered_version(uri=tracking_uri, name=name, tags=tags)
    if version is None:  # else this store has it already (a rerun): once per model and store, checked in the store
        # the installed versions, without a local label such as +cpu (PyPI has none)
        requirements = [f"{p}=={md.version(p).split('+')[0]}" for p in ("torch", "transformers", "pandas")]
        version = tracking.register_model(uri=tracking_uri, run_id=model.run_id, folder=export_folder(model),
                                          name=name, tags=tags, description=description,
                                          example=_example(task_name), pip_requirements=requirements)
    return tracking.promote(uri=tracking_uri, name=name, version=version, description=description)


def _what_it_does(stage: str, task_name: str) -> str:
    labels = GLUE_TASKS[task_name].id2label
    output = (f"`label` (one of {', '.join(labels.values())}) and its probability `score`" if labels else
              "the predicted `score`")
    return (f"Stage {stage} of a dpcompress study on {task_name}. Input: a column `text` (and `text_pair` for sentence "
            f"pairs); output: {output}.")


def _example(task_name: str) -> list[dict]:
    """The registered model's input example: made-up sentences (never data), pairs for a sentence-pair task."""
    pair = len(GLUE_TASKS[task_name].text_columns) == 2
    return [{"text": "a warm, funny and moving film", **({"text_pair": "the film is moving"} if pair else {})},
            {"text": "a dull, tedious mess", **({"text_pair": "the film is brilliant"} if pair else {})}]
