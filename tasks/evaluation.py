"""Prefect tasks at the end of a study: evaluate each model on dev, register the final model, close the study."""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

from prefect import task

from compression.data import load_encoded
from compression.evaluate import evaluate
from compression.models import load_saved
from tasks import tracking
from tasks.caching import STAGE_CACHE
from tasks.refs import DataRef, EvalRef, ModelRef

_PACKAGES = Path(__file__).resolve().parents[1]


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_model(*, stage: str, model: ModelRef, data: DataRef, tracking_uri: str) -> EvalRef:
    """GLUE metric on the public dev split, sparsity, parameters, size and latency; logged to the model's run."""
    net, _ = load_saved(model.path)
    results = evaluate(net, load_encoded(Path(data.path) / "dev.pt"), metric=data.metric, directory=model.path)
    results.update(epsilon=model.epsilon, delta=model.delta)
    Path(model.path).parent.joinpath("eval.json").write_text(json.dumps(results, indent=2))
    if model.run_id:
        tracking.StageRun(tracking.client(tracking_uri), model.run_id).metrics(
            {f"dev_{k}": v for k, v in results.items() if k not in ("epsilon", "delta")})
    return EvalRef(stage=model.stage, model_sha256=model.sha256, results=results, run_id=model.run_id)


@task(name="register_model", cache_policy=STAGE_CACHE, persist_result=True)
def register_final(*, model: ModelRef, name: str, task_name: str, tracking_uri: str) -> str:
    """Log the final model (pytorch flavour) and register it, tagged with its (epsilon, delta) and accountant."""
    net, _ = load_saved(model.path)
    ledger = json.loads(Path(model.ledger_path).read_text())
    accountant = ledger["entries"][-1]["accountant"] if ledger.get("entries") else "none"
    tags = {"epsilon": f"{model.epsilon:.4f}", "delta": f"{model.delta:.3g}", "accountant": accountant,
            "sampling": "poisson", "unit_of_privacy": "example", "stage": model.stage, "task": task_name,
            "model_sha256": model.sha256}
    requirements = [f"{p}=={md.version(p)}" for p in ("torch", "transformers")]
    return tracking.register_model(uri=tracking_uri, run_id=model.run_id, model=net, name=name, tags=tags,
                                   pip_requirements=requirements, code_paths=[str(_PACKAGES / "compression")])


@task(name="open_study")
def open_study(*, tracking_uri: str, experiment: str, study_key: str, name: str, config: dict) -> str:
    return tracking.study_run(uri=tracking_uri, experiment=experiment, study_key=study_key, name=name,
                              config=config)


@task(name="close_study")
def close_study(*, tracking_uri: str, run_id: str, rows: list[dict] | None, failed: bool = False) -> None:
    tracking.end_study(uri=tracking_uri, run_id=run_id, failed=failed, table=rows)
