"""Prefect tasks at the end of a study: evaluate each model on dev, the results table, open and close the study run."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from prefect import task

from compression.data import GLUE_TASKS, load_encoded
from compression.evaluate import evaluate
from compression.export import export_hf, sparse_size_report
from compression.models import load_saved
from compression.pruning.masks import load_masks
from compression.report import write_results
from privacy import files
from privacy.ledger import Ledger, union_epsilon
from tasks import tracking
from tasks.caching import FOLDER_CACHED, NOT_CACHED, finished, mark_finished
from tasks.refs import DataRef, EvalRef, ModelRef, sha256_of


def export_folder(model: ModelRef) -> Path:
    """Where `evaluate_model` exports `model` as a plain HF folder."""
    return Path(model.path).parent / "evaluation" / "hf"


@task(name="evaluate", **FOLDER_CACHED)
def evaluate_model(*, stage: str, model: ModelRef, data: DataRef, tracking_uri: str) -> EvalRef:
    """GLUE metric on the public dev split, sparsity, parameters and size; the model exported as a plain HF folder
    (and, if pruned with masks, in sparse form, with its size), in `<model's stage folder>/evaluation/`; the metrics
    logged to the model's run. Latency is measured side by side by bench/inference.py, not here."""
    out = Path(model.path).parent / "evaluation"
    done = finished(out)
    if done is not None and done.model_sha256 != model.sha256:  # of a model since retrained into the same folder
        done = None
    if done is None:
        shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier model's evaluation or export survives
        net, tokenizer = load_saved(model.path)
        results = evaluate(net, load_encoded(data.dev_file), metric=data.metric, directory=model.path)
        results.update(epsilon=model.epsilon, delta=model.delta)
        export_hf(net, tokenizer, export_folder(model), id2label=GLUE_TASKS[data.task].id2label)
        if model.masks_path:
            report = sparse_size_report(net, load_masks(model.masks_path), out / "sparse")
            results.update(sparse_size_bytes=report["sparse_bytes"], dense_size_bytes=report["dense_bytes"])
        files.write_text(out / "eval.json", json.dumps(results, indent=2))
        done = EvalRef(stage=model.stage, model_sha256=model.sha256, results=results,
                       files={str(out / name): sha256_of(out / name) for name in ("eval.json", "hf")})
        mark_finished(out, done)
    if model.run_id:
        tracking.log_once(tracking_uri, model.run_id, {f"dev_{k}": v for k, v in done.results.items()
                                                       if k not in ("epsilon", "delta")},
                          tags={"hf_export": str(export_folder(model))})  # on disk: too large to upload per model
    return dataclasses.replace(done, run_id=model.run_id)


@task(name="results_table", **FOLDER_CACHED)
def results_table(*, models: list[ModelRef], evaluations: list[EvalRef], lines: dict[str, str], metric: str,
                  scope: str, tracking_uri: str, parent_run_id: str, output_dir: str,
                  profiles: list[EvalRef] = ()) -> list[dict]:
    """One row per model (CSV, Markdown, plots) logged to the study run under results/; returns the rows. With
    `profiles` (tasks.profile), the training columns of the models profiled, and a plot of memory against metric."""
    profiled = {p.stage: p.results for p in profiles}
    rows = [{"stage": m.stage, "line": lines.get(m.stage, m.stage), "metric": e.results["metric"],
             "sparsity": e.results["sparsity"], "parameters": e.results["parameters"],
             "nonzero_parameters": e.results.get("nonzero_parameters"), "size_mb": e.results.get("size_bytes", 0) / 1e6,
             "sparse_size_mb": e.results.get("sparse_size_bytes", 0) / 1e6 or None,
             "epsilon": m.epsilon, "delta": m.delta, **_training_columns(profiled.get(m.stage))}
            for m, e in zip(models, evaluations)]
    private = [m for m in models if math.isfinite(m.epsilon)]
    ledgers = [Ledger.load(m.ledger_path) for m in private]
    accountant, delta = ledgers[-1].entries[-1].accountant, private[-1].delta
    union = union_epsilon(ledgers, delta=delta, accountant=accountant)
    noises = sorted({entry.noise for ledger in ledgers for entry in ledger.entries})
    footer = privacy_footer(scope=scope, union=union, delta=delta, accountant=accountant,
                            baseline=len(private) < len(models), noises=noises)
    directory = Path(output_dir) / "results"
    write_results(rows, directory, metric=metric, footer=footer)
    files.write_text(directory / "footer.txt", footer)
    run = tracking.StageRun(tracking.client(tracking_uri), parent_run_id)
    run.artifact(directory, "results")
    run.metrics({"epsilon_all_models": union})
    return [{(metric if k == "metric" else k): v for k, v in r.items() if v is not None} for r in rows]


def _training_columns(profile: dict | None) -> dict:
    if profile is None:
        return {}
    return {"trainable_parameters": profile["trainable_parameters"], "train_peak_mb": profile["peak_mb"],
            "train_step_mb": profile["step_mb"], "train_step_s": profile["median_step_s"]}


NOISE_NOTES = {
    "secret": "noise and Poisson sampling drawn from generators seeded by the OS (secret)",
    "secure": "noise and Poisson sampling drawn from generators seeded by the OS, with Opacus' secure Gaussian "
              "sampling against floating-point attacks",
    "seeded": "NOISE SEEDED FROM THE CONFIG (privacy.reproducible_noise, a test mode): these models have NO "
              "differential-privacy guarantee; the epsilon column is what the same settings give with secret noise",
}


def privacy_footer(*, scope: str, union: float, delta: float, accountant: str, baseline: bool,
                   noises: list[str]) -> str:
    """What the epsilon column means: its scope, delta, accountant, sampling, unit, the noise source; and the cost of
    releasing all."""
    per = ("cumulative over the study's private stages up to each model" if scope == "study" else
           "of each model's own line (the DP teacher and the stages that produced it)")
    return (f"epsilon: {per}, at the delta shown; {accountant.upper()} accountant, Poisson sampling, unit of "
            f"privacy: one training example (add/remove). Releasing every private model above together: "
            f"epsilon = {union:.4f} at delta = {delta:.3g}. Noise: "
            + "; ".join(NOISE_NOTES[n] for n in noises) + "."
            + (" The nonprivate_teacher row (epsilon = inf) is a baseline without any guarantee." if baseline else ""))


@task(name="open_study", **NOT_CACHED)
def open_study(*, tracking_uri: str, experiment: str, study_key: str, name: str, config: dict) -> str:
    return tracking.study_run(uri=tracking_uri, experiment=experiment, study_key=study_key, name=name,
                              config=config)


@task(name="close_study", **NOT_CACHED)
def close_study(*, tracking_uri: str, run_id: str, rows: list[dict] | None, failed: bool = False) -> None:
    tracking.end_study(uri=tracking_uri, run_id=run_id, failed=failed, table=rows)
