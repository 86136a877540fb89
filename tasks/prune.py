"""Prefect tasks of unstructured DPIMP: the inputs a round reads (statistics of layer inputs, from a DP release of the
private data or from public text; the teacher's outputs on public text) and the round itself (the recipe, then DP
fine-tuning)."""
from __future__ import annotations

import json

import torch
from prefect import task

from compression.data import load_encoded
from compression.distill import distillation_loss
from compression.losses import KDConfig
from compression.models import load_saved
from compression.pruning import statistics
from compression.pruning.masks import PruneSchedule, load_masks
from compression.pruning.public_distill import PublicDistillConfig, public_texts, teacher_targets
from compression.pruning.recipe import PublicDistillation
from compression.pruning.recipe import prune_round as prune_recipe
from compression.train import TrainConfig
from privacy import files
from privacy.config import StageBudget
from privacy.noise import make_generator
from tasks.caching import FOLDER_CACHED, finished, mark_finished, stage_dir
from tasks.lock import folder_lock
from tasks.refs import DataRef, ModelRef, RunContext, StatsRef, sha256_of
from tasks.stage import console_progress, reuse, run_dp_stage, run_release


@task(name="release_statistics", **FOLDER_CACHED)
def release_statistics(*, stage: str, budget: StageBudget, upstream: ModelRef, ledger_from: ModelRef | StatsRef,
                       data: DataRef, schedule: PruneSchedule, seed: int, output_dir: str,
                       context: RunContext) -> StatsRef:
    """Statistics of `upstream`'s layer inputs over the private data, in one DP release (mechanism gaussian_sum)."""
    out = stage_dir(output_dir, stage, {"upstream": upstream, "ledger_from": ledger_from, "schedule": schedule,
                                        "budget": budget})
    if done := reuse(out, stage, context):
        return done

    def release() -> dict:
        return statistics.release_statistics(
            load_saved(upstream.path)[0], load_encoded(data.train_file), include=schedule.include,
            reconstruct=schedule.reconstruct, noise_multiplier=budget.noise_multiplier,
            secure_mode=budget.secure_mode, generator=make_generator(seed) if budget.seeded else None)
    return run_release(name=stage, budget=budget, release=release, data=data, out=out, ledger_from=ledger_from,
                       context=context)


@task(name="public_statistics", **FOLDER_CACHED)
def public_statistics(*, model: ModelRef, calibration: list[DataRef], include: str, output_dir: str) -> StatsRef:
    """Statistics of `model`'s layer inputs summed over public calibration texts: no noise, no ledger entry (no
    private data is read). Per model and texts: per-target lines, which all prune the teacher, share them."""
    out = stage_dir(output_dir, "calibration_statistics", {"model": model.sha256, "texts": calibration,
                                                            "include": include})
    return _public_tensors(out, "calibration_statistics", lambda: statistics.public_statistics(
        load_saved(model.path)[0], [load_encoded(c.train_file) for c in calibration], include=include))


@task(name="public_targets", **FOLDER_CACHED)
def public_targets(*, teacher: ModelRef, calibration: list[DataRef], split_pairs: bool, output_dir: str) -> StatsRef:
    """The DP teacher's outputs on the public calibration texts (post-processing of a DP model on public text)."""
    out = stage_dir(output_dir, "public_targets", {"teacher": teacher.sha256, "texts": calibration,
                                                    "split_pairs": split_pairs})
    return _public_tensors(out, "public_targets", lambda: teacher_targets(load_saved(teacher.path)[0],
                                                                          _texts(calibration, split_pairs)))


def _public_tensors(out, stage: str, compute) -> StatsRef:
    """Tensors computed from public text only (no privacy cost, no ledger, nothing logged), kept in `out`: computed
    once, by the first of the concurrent lines that need them (the others wait for it)."""
    if done := finished(out):
        return done
    with folder_lock(out):
        if done := finished(out):  # another line computed them while this one waited
            return done
        path = files.torch_save(compute(), out / "tensors.pt")
        ref = StatsRef(stage=stage, path=str(path), sha256=sha256_of(path))
        mark_finished(out, ref)
        return ref


def _texts(calibration: list[DataRef], split_pairs: bool) -> dict:
    return public_texts([load_encoded(c.train_file) for c in calibration], split_pairs=split_pairs)


@task(name="prune_round", **FOLDER_CACHED)
def prune_round(*, stage: str, budget: StageBudget, round_index: int, upstream: ModelRef,
                ledger_from: ModelRef | StatsRef, data: DataRef, teacher: ModelRef, schedule: PruneSchedule, method,
                train: TrainConfig, kd: KDConfig, rewind: bool, statistics: StatsRef | None = None,
                public_distill: PublicDistillConfig | None = None, calibration: list[DataRef] | None = None,
                targets: StatsRef | None = None, output_dir: str, context: RunContext) -> ModelRef:
    """Prune `upstream` to round `round_index`'s sparsity (compression.pruning.recipe), then DP fine-tune it, with KD
    from the DP teacher when `kd.weight` > 0."""
    out = stage_dir(output_dir, stage, {"upstream": upstream, "ledger_from": ledger_from, "teacher": teacher,
                                        "schedule": schedule, "method": method, "train": train, "kd": kd,
                                        "rewind": rewind, "budget": budget, "round": round_index,
                                        "statistics": statistics, "public_distill": public_distill,
                                        "targets": targets})
    if done := reuse(out, stage, context):
        return done
    out.mkdir(parents=True, exist_ok=True)
    net, tokenizer = load_saved(upstream.path)
    reference = load_saved(teacher.path)[0] if rewind or kd.weight > 0 or public_distill else None
    public = None if public_distill is None else PublicDistillation(
        config=public_distill, texts=_texts(calibration, public_distill.split_pairs),
        targets=torch.load(targets.path, weights_only=True))
    result = prune_recipe(
        net, schedule=schedule, round_index=round_index, teacher=reference, rewind=rewind, public=public,
        previous_masks=load_masks(upstream.masks_path) if upstream.masks_path else None, workdir=out,
        statistics=torch.load(statistics.path, weights_only=True) if statistics else None,
        on_step=console_progress(stage, "public distillation, no private data"))
    files.write_text(out / "sparsity.json", json.dumps(result.sparsity, indent=2))  # per tensor and "overall"
    if result.reconstruction is not None:
        files.write_text(out / "reconstruction.json", json.dumps(result.reconstruction, indent=2))
    loss_fn = distillation_loss(reference, load_encoded(data.train_file), kd) if kd.weight > 0 else None
    return run_dp_stage(name=stage, budget=budget, model=net, tokenizer=tokenizer, data=data, train=train,
                        method=method, out=out, ledger_from=ledger_from, context=context, masks=result.masks,
                        loss_fn=loss_fn, params={"target_sparsity": schedule.sparsity_after(round_index),
                                                 "schedule": vars(schedule), "kd": vars(kd), "rewind": rewind,
                                                 "mask_sparsity": result.sparsity["overall"]})
