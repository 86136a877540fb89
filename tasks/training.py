"""Prefect tasks for the stages that train on private data: DP teacher, DP pruning rounds, DP distillation.

Each checks the study ledger before touching data, trains through the library, saves model + ledger,
logs to its MLflow stage run, and returns a `ModelRef`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from prefect import get_run_logger, task

from compression.activations import dp_input_norms, dp_second_moments, input_norms_from, public_second_moments
from compression.data import load_encoded
from compression.distill import DistillConfig, kd_loss, make_student
from compression.evaluate import predict
from compression.models import ModelConfig, load_classifier, load_saved, save_classifier
from compression.prune import (PruneConfig, load_masks, magnitude_masks, save_masks, sparsity_report,
                               stats_stage)
from compression.public_kd import PublicDistillConfig, public_distill, public_texts, teacher_targets
from compression.reconstruct import reconstruct
from compression.train import TrainConfig, dp_train
from privacy.accounting import DPEvent, compose_epsilon
from privacy.config import StageBudget
from privacy.dataset_ledger import DatasetLedger
from privacy.ledger import Ledger, LedgerEntry
from tasks import tracking
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.console import console
from tasks.refs import BudgetAccount, DataRef, ModelRef, sha256_of


def _progress(stage: str, run: tracking.StageRun, ledger: Ledger, event: DPEvent, budget: StageBudget):
    """An on_step callback. The loss (a mean over private examples) goes to the local console only; Prefect's log
    gets steps, epsilon so far and the ETA (public), every minute; MLflow gets epsilon."""
    local, public = console(), get_run_logger()
    began, last, first = time.monotonic(), [0.0, 0.0], []

    def on_step(step: int, metrics: dict) -> None:
        now = time.monotonic()
        first or first.append(step - 1)  # a resumed stage starts past step 1
        done = step == metrics["num_steps"]
        if not done and now - last[0] < 15:
            return
        last[0] = now
        partial = DPEvent(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, num_steps=step)
        eps = compose_epsilon([*ledger.events(), partial], delta=budget.delta, accountant=budget.accountant)
        eta = (now - began) / max(1, step - first[0]) * (metrics["num_steps"] - step)
        local.info("%s: step %d/%d  loss %.4f  eps %.3f/%.3f  ETA %ds", stage, step, metrics["num_steps"],
                   metrics["loss"], eps, budget.target_epsilon, eta)
        if done or now - last[1] >= 60:
            last[1] = now
            public.info("%s: step %d/%d  eps %.3f/%.3f  ETA %ds", stage, step, metrics["num_steps"], eps,
                        budget.target_epsilon, eta)
        run.metrics({"epsilon_spent": eps}, step=step)
    return on_step


def _console_progress(stage: str, what: str = "not private"):
    """An on_step callback for non-DP training (the non-private baseline; distillation on public text): steps, loss
    and ETA on the local console only."""
    local, began, last = console(), time.monotonic(), [0.0]

    def on_step(step: int, metrics: dict) -> None:
        now = time.monotonic()
        if step == metrics["num_steps"] or now - last[0] >= 15:
            last[0] = now
            eta = (now - began) / step * (metrics["num_steps"] - step)
            local.info("%s: step %d/%d  loss %.4f  (%s)  ETA %ds", stage, step, metrics["num_steps"],
                       metrics["loss"], what, eta)
    return on_step


def _sgd_event(train: TrainConfig, data: DataRef, budget: StageBudget) -> DPEvent:
    return DPEvent(noise_multiplier=budget.noise_multiplier, sample_rate=train.sample_rate(data.num_train),
                   num_steps=train.num_steps(data.num_train))


def _begin(account: BudgetAccount, stage: str, event: DPEvent, mechanism: str) -> None:
    """The dataset's lifetime budget, checked race-free right before a release (privacy.dataset_ledger)."""
    with DatasetLedger(account.url) as lifetime:
        lifetime.begin(dataset=account.dataset, study=account.study, study_key=account.study_key,
                       run_id=account.run_id, stage=stage, event=event, mechanism=mechanism,
                       epsilon_budget=account.epsilon_budget, delta=account.delta, accountant=account.accountant)


def _commit(account: BudgetAccount, stage: str, out: Path, max_grad_norm: float, noise: str) -> None:
    """The release is spent: its reservation becomes a row of the dataset's history."""
    with DatasetLedger(account.url) as lifetime:
        lifetime.commit(dataset=account.dataset, run_id=account.run_id, stage=stage, stage_key=out.name,
                        max_grad_norm=max_grad_norm, noise=noise)


def _dp_stage(*, stage: str, model, tokenizer, data: DataRef, train: TrainConfig, budget: StageBudget,
              spent: ModelRef | Ledger | None, out: Path, tracking_uri: str, parent_run_id: str,
              account: BudgetAccount, masks=None, loss_fn=None, params: dict | None = None) -> ModelRef:
    """DP-train `model`, extending the ledger `spent` (a ledger, or the one saved with a model ref)."""
    ledger = spent if isinstance(spent, Ledger) else Ledger.load(spent.ledger_path) if spent else Ledger()
    event = _sgd_event(train, data, budget)
    epsilon = ledger.check_fits(stage=stage, event=event, target_epsilon=budget.target_epsilon,
                                delta=budget.delta, accountant=budget.accountant)  # refuses before any data
    _begin(account, stage, event, "dp_sgd")
    with tracking.stage_run(uri=tracking_uri, parent_run_id=parent_run_id, stage=stage) as run:
        run.params({"train": vars(train), "noise_multiplier": event.noise_multiplier,
                    "sample_rate": event.sample_rate, "num_steps": event.num_steps, **(params or {})})
        encoded = load_encoded(Path(data.path) / "train.pt")
        dp_train(model, encoded, config=train, noise_multiplier=event.noise_multiplier, masks=masks,
                 loss_fn=loss_fn, on_step=_progress(stage, run, ledger, event, budget),
                 secure_mode=budget.secure_mode, noise_seed=train.seed if budget.seeded else None,
                 checkpoint_dir=out / "checkpoint")
        ledger = ledger.append(LedgerEntry(
            stage=stage, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate,
            num_steps=event.num_steps, max_grad_norm=train.max_grad_norm, epsilon_after=epsilon,
            delta=budget.delta, accountant=budget.accountant, dataset_fingerprint=data.fingerprint,
            noise=budget.noise))
        save_classifier(model, tokenizer, out / "model")
        ledger.save(out / "ledger.json")
        masks_path = None
        if masks:
            save_masks(masks, out / "masks.pt")
            masks_path = str(out / "masks.pt")
        _commit(account, stage, out, train.max_grad_norm, budget.noise)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # holds noise RNG state: never outlives the stage
        run.metrics({"epsilon": epsilon, "delta": budget.delta})
        run.tags(tracking.guarantee_tags(epsilon=epsilon, delta=budget.delta, accountant=budget.accountant,
                                         noise=budget.noise))
        run.artifact(out / "ledger.json")
    return ModelRef(stage=stage, path=str(out / "model"), sha256=sha256_of(out / "model"),
                    ledger_path=str(out / "ledger.json"), ledger_sha256=sha256_of(out / "ledger.json"),
                    epsilon=epsilon, delta=budget.delta, run_id=run.run_id, masks_path=masks_path)


@task(name="train_teacher", cache_policy=STAGE_CACHE, persist_result=True)
def train_teacher(*, stage: str, data: DataRef, model: ModelConfig, train: TrainConfig, budget: StageBudget,
                  output_dir: str, tracking_uri: str, parent_run_id: str, account: BudgetAccount) -> ModelRef:
    out = stage_dir(output_dir, stage, {"data": data, "model": model, "train": train, "budget": budget})
    net, tokenizer = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling,
                                     dropout=model.dropout, seed=train.seed)
    return _dp_stage(stage=stage, model=net, tokenizer=tokenizer, data=data, train=train, budget=budget,
                     spent=None, out=out, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     account=account, params={"model": vars(model)})


@task(name="prune_round", cache_policy=STAGE_CACHE, persist_result=True)
def prune_round(*, stage: str, round_index: int, upstream: ModelRef, data: DataRef, schedule: PruneConfig,
                train: TrainConfig, budget: StageBudget, output_dir: str, tracking_uri: str, parent_run_id: str,
                account: BudgetAccount, spent: ModelRef | None = None, teacher: ModelRef | None = None,
                distill_alpha: float = 0.0,
                temperature: float = 2.0, rewind: bool = False, stats_budget: StageBudget | None = None,
                calibration: list[DataRef] | None = None,
                public_distill: PublicDistillConfig | None = None) -> ModelRef:
    """Prune `upstream` to this round's sparsity, then DP fine-tune (KD from `teacher` when distill_alpha > 0;
    surviving weights reset to the teacher's first when `rewind`). `spent`: the ledger to extend (default upstream).
    Scorer "activation" and reconstruction read input statistics: from public `calibration` texts, or else released
    from the private data with DP at `stats_budget` (ledger stage `{stage}_stats`). `public_distill`: before the DP
    fine-tuning, the pruned model mimics the DP teacher on the `calibration` texts (public: no privacy cost)."""
    out = stage_dir(output_dir, stage, {"upstream": upstream, "spent": spent, "teacher": teacher,
                                        "schedule": schedule, "train": train, "budget": budget, "round": round_index,
                                        "kd": [distill_alpha, temperature, rewind], "stats": stats_budget,
                                        "calibration": calibration, "public_distill": public_distill})
    net, tokenizer = load_saved(upstream.path)
    previous = load_masks(upstream.masks_path) if upstream.masks_path else None
    target = schedule.sparsity_after(round_index)
    ledger, stats = Ledger.load((spent or upstream).ledger_path), {}
    out.mkdir(parents=True, exist_ok=True)
    if schedule.releases_statistics and calibration:
        stats = _public_statistics(net, upstream, calibration, schedule, output_dir)
    elif schedule.releases_statistics:
        ledger, stats = _release_statistics(stage, net, data, schedule, stats_budget, ledger, out, account,
                                            then=(_sgd_event(train, data, budget), budget), seed=train.seed)
    input_norms = stats.get("input_norms")
    masks = magnitude_masks(net, sparsity=target, include=schedule.include, scope=schedule.scope,
                            scorer=schedule.scorer, previous=previous, input_norms=input_norms)
    get_run_logger().info("%s: pruning to %.1f%% of %s weights (%s, %s)", stage, 100 * target, schedule.include,
                          schedule.scorer, schedule.scope)
    report = sparsity_report(masks)
    (out / "sparsity.json").write_text(json.dumps(report, indent=2))  # per tensor and "overall"
    loss_fn, source = None, teacher or upstream  # the model to rewind to and distil from, loaded once
    from_teacher = teacher is not None and (rewind or distill_alpha > 0)
    reference = load_saved(source.path)[0] if from_teacher or public_distill is not None else None
    if from_teacher and rewind:
        net.load_state_dict(reference.state_dict())  # dp_train multiplies the masks in before training
    if from_teacher and distill_alpha > 0:
        loss_fn = _kd_loss(reference, data, alpha=distill_alpha, temperature=temperature)
    if schedule.reconstruct:  # post-processing of the released second moments
        errors = reconstruct(net, masks, stats["second_moments"], damping=schedule.reconstruct_damping)
        (out / "reconstruction.json").write_text(json.dumps(errors, indent=2))
    if public_distill is not None:
        _distill_on_public(stage, net, reference, source.sha256, calibration, public_distill, masks, output_dir, out)
    return _dp_stage(stage=stage, model=net, tokenizer=tokenizer, data=data, train=train, budget=budget,
                     spent=ledger, out=out, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     account=account, masks=masks, loss_fn=loss_fn,
                     params={"target_sparsity": target, "schedule": vars(schedule), "mask_sparsity": report["overall"],
                             "distill_alpha": distill_alpha, "rewind": rewind,
                             "public_distill": vars(public_distill) if public_distill else None})


def _save(obj, path: Path) -> None:
    """torch.save, atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _cached(path: Path, compute):
    """What `path` holds, else `compute()`, saved there first (public, per-input caches shared across lines)."""
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    _save(value, path)
    return value


def _distill_on_public(stage: str, net, teacher, teacher_sha256: str, calibration: list[DataRef] | None,
                       config: PublicDistillConfig, masks, output_dir: str, out: Path) -> None:
    """`net` (masks kept) mimics the DP teacher on the public calibration texts: no private example is read, so no
    ledger entry. The teacher's outputs are saved once per teacher and texts (per-target lines share them)."""
    if not calibration:
        raise ValueError(f"{stage}: public_distill needs public calibration texts (prune.calibration)")
    report, saved = out / "public_distill.json", out / "public_distilled.pt"
    if saved.exists() and report.exists():  # a rerun of a stage that failed later: the distilled weights are kept
        net.load_state_dict(torch.load(saved, weights_only=True))
        return
    texts = public_texts([load_encoded(Path(source.path) / "train.pt") for source in calibration],
                         split_pairs=config.split_pairs)
    path = stage_dir(output_dir, "public_targets", {"teacher": teacher_sha256, "texts": calibration,
                                                     "split_pairs": config.split_pairs}) / "targets.pt"
    targets = _cached(path, lambda: teacher_targets(teacher, texts))
    get_run_logger().info("%s: distilling the DP teacher on %d public texts (no private data, no privacy cost)",
                          stage, len(texts))
    result = public_distill(net, teacher, texts, config=config, targets=targets, masks=masks,
                            on_step=_console_progress(stage, "public distillation, no private data"))
    _save(net.state_dict(), saved)
    report.write_text(json.dumps({"num_texts": len(texts), **result, "config": vars(config)}, indent=2))


def _public_statistics(net, upstream: ModelRef, calibration: list[DataRef], schedule: PruneConfig,
                       output_dir: str) -> dict:
    """Input statistics summed over public calibration texts: no noise, no ledger entry (no private data is read).
    Saved per model and texts, so per-target lines, which all prune the teacher, compute them once."""
    path = stage_dir(output_dir, "calibration_statistics", {"model": upstream.sha256, "texts": calibration,
                                                             "include": schedule.include}) / "second_moments.pt"

    def compute():
        moments = {}
        for source in calibration:
            part = public_second_moments(net, load_encoded(Path(source.path) / "train.pt"), include=schedule.include)
            shared = {}  # query, key and value share one matrix: add it once
            for name, value in part.items():
                moments[name] = shared.setdefault(id(value), moments.get(name, 0) + value)
        return moments
    moments = _cached(path, compute)
    return {"second_moments": moments, "input_norms": input_norms_from(moments)}


def _release_statistics(stage, net, data: DataRef, schedule: PruneConfig, budget: StageBudget | None,
                        ledger: Ledger, out: Path, account: BudgetAccount, *, then: tuple[DPEvent, StageBudget],
                        seed: int):
    """The ledger with stage `{stage}_stats` recorded, and the DP input statistics: {"input_norms"} (a Gaussian sum of
    norms) or, to reconstruct, {"second_moments", "input_norms"} from one release of second moments (q = 1). Refuses
    before touching data unless both the release and the fine-tuning after it (`then`) fit the budget. A rerun
    of a failed stage reuses the saved release (the same release, accounted once) rather than drawing another."""
    name = stats_stage(stage)
    if budget is None:
        raise ValueError(f"{stage}: scorer {schedule.scorer!r} / reconstruct needs a stats_budget for stage {name!r}")
    event = DPEvent(noise_multiplier=budget.noise_multiplier, sample_rate=1.0, num_steps=1)
    ledger.check_fits(stage=name, event=event, target_epsilon=budget.target_epsilon, delta=budget.delta,
                      accountant=budget.accountant)
    ledger = ledger.record(stage=name, event=event, max_grad_norm=1.0, delta=budget.delta,
                           accountant=budget.accountant, dataset_fingerprint=data.fingerprint, mechanism="gaussian_sum",
                           noise=budget.noise)
    ledger.check_fits(stage=stage, event=then[0], target_epsilon=then[1].target_epsilon, delta=then[1].delta,
                      accountant=then[1].accountant)
    saved = out / "input_statistics.pt"
    if saved.exists():  # released (and charged) by an earlier attempt of this stage
        return ledger, torch.load(saved, weights_only=True)
    _begin(account, name, event, "gaussian_sum")
    kwargs = {"include": schedule.include, "noise_multiplier": budget.noise_multiplier,
              "secure_mode": budget.secure_mode,  # noise from the OS unless in the seeded test mode
              "generator": torch.Generator().manual_seed(seed) if budget.seeded else None}
    train_data = load_encoded(Path(data.path) / "train.pt")
    if schedule.reconstruct:
        moments = dp_second_moments(net, train_data, **kwargs)
        stats = {"second_moments": moments, "input_norms": input_norms_from(moments)}
    else:
        stats = {"input_norms": dp_input_norms(net, train_data, **kwargs)}
    _commit(account, name, out, 1.0, budget.noise)
    torch.save(stats, saved)  # a DP release: safe to keep, and never redrawn
    get_run_logger().info("%s: input statistics released (sigma %.3g, epsilon now %.3f)", name,
                          budget.noise_multiplier, ledger.entries[-1].epsilon_after)
    return ledger, stats


def _kd_loss(teacher, data: DataRef, *, alpha: float, temperature: float):
    """Per-example KD loss against the DP teacher's soft labels (post-processing of a DP model: no privacy cost)."""
    soft = torch.as_tensor(predict(teacher, load_encoded(Path(data.path) / "train.pt")))

    def loss_fn(logits, labels, index):
        return kd_loss(logits, soft[index], labels, alpha=alpha, temperature=temperature)
    return loss_fn


@task(name="distill", cache_policy=STAGE_CACHE, persist_result=True)
def distill(*, stage: str, teacher: ModelRef, spent: ModelRef, data: DataRef, method: DistillConfig,
            train: TrainConfig, budget: StageBudget, output_dir: str, tracking_uri: str,
            parent_run_id: str, account: BudgetAccount, base_model: str | None = None) -> ModelRef:
    """DPKD: a student (`method.init`) trained with DP-SGD on (1 - alpha) CE + alpha T^2 KL to the DP teacher."""
    out = stage_dir(output_dir, stage, {"teacher": teacher, "spent": spent, "method": method, "train": train,
                                        "budget": budget, "base": base_model})
    net, tokenizer = load_saved(teacher.path)
    student = make_student(net, method, base=base_model,
                           teacher_vocab=tokenizer.get_vocab() if tokenizer is not None else None)
    loss_fn = _kd_loss(net, data, alpha=method.alpha, temperature=method.temperature)
    return _dp_stage(stage=stage, model=student, tokenizer=tokenizer, data=data, train=train, budget=budget,
                     spent=spent, out=out, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                     account=account, loss_fn=loss_fn,
                     params={"method": vars(method), "student_layers": student.num_layers})


@task(name="train_nonprivate", cache_policy=STAGE_CACHE, persist_result=True)
def train_nonprivate(*, stage: str, data: DataRef, model: ModelConfig, train: TrainConfig, output_dir: str,
                     tracking_uri: str, parent_run_id: str, account: BudgetAccount) -> ModelRef:
    """A non-private baseline teacher (no noise; epsilon = infinity). Its record is deliberately not a privacy
    ledger, so `Ledger.load` refuses it and no private stage can start from it."""
    out = stage_dir(output_dir, stage, {"data": data, "model": model, "train": train})
    net, tokenizer = load_classifier(model.name_or_path, num_labels=data.num_labels, pooling=model.pooling,
                                     dropout=model.dropout, seed=train.seed)
    with tracking.stage_run(uri=tracking_uri, parent_run_id=parent_run_id, stage=stage) as run:
        run.params({"train": vars(train), "private": False, "model": vars(model)})
        dp_train(net, load_encoded(Path(data.path) / "train.pt"), config=train, noise_multiplier=0.0,
                 checkpoint_dir=out / "checkpoint", on_step=_console_progress(stage))
        save_classifier(net, tokenizer, out / "model")
        record = {"format": "dpcompress.nonprivate/1", "epsilon": "inf", "dataset_fingerprint": data.fingerprint,
                  "note": "trained on the private data WITHOUT differential privacy: a baseline, never release it"}
        (out / "ledger.json").write_text(json.dumps(record, indent=2))
        with DatasetLedger(account.url) as lifetime:  # listed in the dataset's history, never composed
            lifetime.record_nonprivate(dataset=account.dataset, study=account.study, study_key=account.study_key,
                                       run_id=account.run_id, stage=stage, stage_key=out.name)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        run.tags({"epsilon": "inf", "private": "false"})
        run.artifact(out / "ledger.json")
    return ModelRef(stage=stage, path=str(out / "model"), sha256=sha256_of(out / "model"),
                    ledger_path=str(out / "ledger.json"), ledger_sha256=sha256_of(out / "ledger.json"),
                    epsilon=math.inf, delta=0.0, run_id=run.run_id)
