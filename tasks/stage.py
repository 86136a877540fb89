"""The one runner of every stage that releases something computed on the private data.

check the study ledger and the dataset's lifetime budget (before any data is read) -> train or release -> save ->
record the ledger entry -> charge the dataset ledger -> log to the stage's MLflow run -> return a small reference.
The numbers (sigma, q, steps, mechanism) come from the study's plan (`StageBudget`), never recomputed here.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from compression.data import load_encoded
from compression.methods import merge, prepare
from compression.models import save_classifier
from compression.pruning.masks import save_masks
from compression.train import TrainConfig, dp_train
from privacy import files
from privacy.accounting import compose_epsilon
from privacy.config import StageBudget
from privacy.dataset_ledger import DatasetLedger
from privacy.ledger import Ledger
from tasks import tracking
from tasks.caching import RELEASED, finished, mark_finished, mark_released
from tasks.console import console, run_logger
from tasks.refs import BudgetAccount, DataRef, ModelRef, RunContext, StatsRef, sha256_of


def reuse(out: Path, stage: str, context: RunContext | None):
    """The reference of a stage that already finished in `out` (outputs verified, caching.finished), logged in the
    current tracking store (its run there, or the same logging replayed into a new store); None to run it."""
    ref = finished(out)
    if ref is not None:
        run_logger().info("%s: reusing %s (finished, outputs verified)", stage, out.name)
    if ref is None or context is None:
        return ref
    uri, parent = context.tracking_uri, context.parent_run_id
    run_id = tracking.finished_stage_run(uri=uri, parent_run_id=parent, stage_key=out.name)
    if run_id is None:
        logged = json.loads((out / "tracking.json").read_text())
        run_id = tracking.replay(uri=uri, parent_run_id=parent, stage=stage, stage_key=out.name, logged=logged)
    return dataclasses.replace(ref, run_id=run_id) if hasattr(ref, "run_id") else ref


def load_ledger(source: ModelRef | StatsRef | None) -> Ledger:
    """The ledger a stage extends: the one saved with its source (empty for the first stage)."""
    return Ledger.load(source.ledger_path) if source is not None and source.ledger_path else Ledger()


def run_dp_stage(*, name: str, budget: StageBudget, model, tokenizer, data: DataRef, train: TrainConfig, method,
                 out: Path, ledger_from: ModelRef | StatsRef | None, context: RunContext, masks=None, loss_fn=None,
                 params: dict | None = None) -> ModelRef:
    """DP-train `model` (stage `name`, its event from `budget`) and release it as `out/model` with its ledger.
    Written in this order, so that a stage killed at any point loses nothing finished: the model and ledger, the
    dataset ledger's record, `released.json` (from here a rerun only logs), the stage's logging, `done.json` (the
    stage counts as finished), and only then the checkpoint goes (a stage killed before `released.json` resumes
    from its last checkpoint)."""
    released = finished(out, RELEASED)
    ledger = None if released is not None else _check(name, budget, ledger_from, context.account)
    with tracking.stage_run(uri=context.tracking_uri, parent_run_id=context.parent_run_id, stage=name,
                            stage_key=out.name) as run:
        event = budget.event
        run.params({"train": vars(train), "method": vars(method), "noise_multiplier": event.noise_multiplier,
                    "sample_rate": event.sample_rate, "num_steps": event.num_steps, **(params or {})})
        run.dataset(data)
        if released is None:
            model = prepare(model, method)
            dp_train(model, load_encoded(Path(data.path) / "train.pt"), config=train, method=method, event=event,
                     masks=masks, loss_fn=loss_fn, on_step=_progress(name, run, ledger, budget),
                     secure_mode=budget.secure_mode, noise_seed=train.seed if budget.seeded else None,
                     checkpoint_dir=out / "checkpoint")
            model = merge(model, method)
            ledger = _record(name, budget, ledger, data, train.max_grad_norm)
            save_classifier(model, tokenizer, out / "model")
            ledger.save(out / "ledger.json")
            if masks:
                save_masks(masks, out / "masks.pt")
            _charge(context.account, name, out, train.max_grad_norm, budget.noise)
            released = ModelRef(stage=name, path=str(out / "model"), sha256=sha256_of(out / "model"),
                                ledger_path=str(out / "ledger.json"), ledger_sha256=sha256_of(out / "ledger.json"),
                                epsilon=ledger.entries[-1].epsilon_after, delta=budget.delta,
                                masks_path=str(out / "masks.pt") if masks else None,
                                masks_sha256=sha256_of(out / "masks.pt") if masks else None)
            mark_released(out, released)
        else:
            run_logger().info("%s: saved and accounted before an interruption; logging it", name)
        _log_release(run, Ledger.load(released.ledger_path), budget, out)
        ref = dataclasses.replace(released, run_id=run.run_id)
        mark_finished(out, ref, run.logged)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # holds the noise generator: never outlives the stage
    return ref


def run_release(*, name: str, budget: StageBudget, release: Callable[[], dict], data: DataRef, out: Path,
                ledger_from: ModelRef | StatsRef, context: RunContext) -> StatsRef:
    """One noisy release of statistics of the private data (`release()`, at `budget`'s sigma), saved as
    `out/statistics.pt` with the ledger that records it. A rerun after a later failure reuses the saved release
    (the same release, accounted once) rather than drawing another; a saved release that no longer matches its
    digests is refused (redrawing it would spend again: delete the folder to do that)."""
    saved = out / "statistics.pt"
    released = finished(out, RELEASED)
    if released is None and saved.exists():
        raise ValueError(f"{saved}: a DP release saved earlier is damaged or incomplete (its files no longer match "
                         f"{RELEASED}); delete {out} to release again, which spends its epsilon again")
    if released is None:
        ledger = _check(name, budget, ledger_from, context.account)
        out.mkdir(parents=True, exist_ok=True)
        statistics = release()
        _charge(context.account, name, out, 1.0, budget.noise)
        files.torch_save(statistics, saved)  # a DP release: safe to keep, and never redrawn
        ledger = _record(name, budget, ledger, data, 1.0)
        ledger.save(out / "ledger.json")
        released = StatsRef(stage=name, path=str(saved), sha256=sha256_of(saved), ledger_path=str(out / "ledger.json"),
                            ledger_sha256=sha256_of(out / "ledger.json"))
        mark_released(out, released)
    ledger = Ledger.load(released.ledger_path)
    with tracking.stage_run(uri=context.tracking_uri, parent_run_id=context.parent_run_id, stage=name,
                            stage_key=out.name) as run:
        run.params({"mechanism": budget.mechanism, "noise_multiplier": budget.noise_multiplier})
        run.dataset(data)
        _log_release(run, ledger, budget, out)
        mark_finished(out, released, run.logged)
    run_logger().info("%s: released (sigma %.3g, epsilon now %.3f)", name, budget.noise_multiplier,
                      ledger.entries[-1].epsilon_after)
    return released


def _check(name: str, budget: StageBudget, ledger_from, account: BudgetAccount | None) -> Ledger:
    """Refuse before any data is read: the study's ledger with this stage, then the dataset's lifetime budget."""
    ledger = load_ledger(ledger_from)
    ledger.check_fits(stage=name, event=budget.event, target_epsilon=budget.target_epsilon, delta=budget.delta,
                      accountant=budget.accountant)
    if account is not None:
        with DatasetLedger(account.url) as lifetime:
            lifetime.begin(dataset=account.dataset, study=account.study, study_key=account.study_key,
                           run_id=account.run_id, stage=name, event=budget.event, mechanism=budget.mechanism,
                           epsilon_budget=account.epsilon_budget, delta=account.delta, accountant=account.accountant)
    return ledger


def _record(name: str, budget: StageBudget, ledger: Ledger, data: DataRef, max_grad_norm: float) -> Ledger:
    return ledger.record(stage=name, event=budget.event, max_grad_norm=max_grad_norm, delta=budget.delta,
                         accountant=budget.accountant, dataset_fingerprint=data.fingerprint,
                         mechanism=budget.mechanism, noise=budget.noise)


def _charge(account: BudgetAccount | None, name: str, out: Path, max_grad_norm: float, noise: str) -> None:
    """The release is spent: its reservation becomes a row of the dataset's history."""
    if account is not None:
        with DatasetLedger(account.url) as lifetime:
            lifetime.commit(dataset=account.dataset, run_id=account.run_id, stage=name, stage_key=out.name,
                            max_grad_norm=max_grad_norm, noise=noise)


def _log_release(run: tracking.StageRun, ledger: Ledger, budget: StageBudget, out: Path) -> None:
    epsilon = ledger.entries[-1].epsilon_after
    run.metrics({"epsilon": epsilon, "delta": budget.delta})
    run.tags(tracking.guarantee_tags(epsilon=epsilon, delta=budget.delta, accountant=budget.accountant,
                                     noise=budget.noise))
    run.artifact(out / "ledger.json")


def _progress(name: str, run: tracking.StageRun, ledger: Ledger, budget: StageBudget):
    """An on_step callback. The loss (a mean over private examples) goes to the local console only; Prefect's log
    gets steps, epsilon so far and the ETA (public), every minute; MLflow gets epsilon."""
    local, public, event = console(), run_logger(), budget.event
    began, last, first = time.monotonic(), [0.0, 0.0], []

    def on_step(step: int, metrics: dict) -> None:
        now = time.monotonic()
        first or first.append(step - 1)  # a resumed stage starts past step 1
        done = step == metrics["num_steps"]
        if not done and now - last[0] < 15:
            return
        last[0] = now
        spent = [*ledger.events(), dataclasses.replace(event, num_steps=step)]
        eps = compose_epsilon(spent, delta=budget.delta, accountant=budget.accountant)
        eta = (now - began) / max(1, step - first[0]) * (metrics["num_steps"] - step)
        local.info("%s: step %d/%d  loss %.4f  eps %.3f/%.3f  ETA %ds", name, step, metrics["num_steps"],
                   metrics["loss"], eps, budget.target_epsilon, eta)
        if done or now - last[1] >= 60:
            last[1] = now
            public.info("%s: step %d/%d  eps %.3f/%.3f  ETA %ds", name, step, metrics["num_steps"], eps,
                        budget.target_epsilon, eta)
        run.metrics({"epsilon_spent": eps}, step=step)
    return on_step


def console_progress(name: str, what: str = "not private"):
    """An on_step callback for training without DP (the non-private baseline; distillation on public text): steps,
    loss and ETA on the local console only."""
    local, began, last = console(), time.monotonic(), [0.0]

    def on_step(step: int, metrics: dict) -> None:
        now = time.monotonic()
        if step == metrics["num_steps"] or now - last[0] >= 15:
            last[0] = now
            eta = (now - began) / step * (metrics["num_steps"] - step)
            local.info("%s: step %d/%d  loss %.4f  (%s)  ETA %ds", name, step, metrics["num_steps"],
                       metrics["loss"], what, eta)
    return on_step
