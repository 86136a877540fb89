"""One round of unstructured DPIMP before its DP fine-tuning, as a pure function: masks (from weights, or weights and
input statistics) -> rewind to the teacher -> reconstruction of the kept weights -> distillation on public text.

Everything here is post-processing of DP releases (the model, released statistics) or uses public text only: no
private example is read and nothing is accounted. The DP fine-tuning after it is compression.train.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.models import TextClassifier
from compression.pruning.masks import PruneSchedule, prune_masks, sparsity_report
from compression.pruning.public_distill import PublicDistillConfig, public_distill
from compression.pruning.reconstruct import reconstruct
from privacy import files


@dataclass(frozen=True, kw_only=True)
class PublicDistillation:
    """What distillation on public text needs: its config, the texts (`public_texts`) and the teacher's outputs on
    them (`teacher_targets`)."""

    config: PublicDistillConfig
    texts: dict
    targets: dict


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    masks: dict[str, torch.Tensor]
    sparsity: dict[str, float]            # per tensor, and "overall"
    reconstruction: dict[str, float] | None = None   # per tensor: output error after / before (under H)
    public_distill: dict | None = None    # steps and losses on the public texts


def prune_round(model: TextClassifier, *, schedule: PruneSchedule, round_index: int,
                previous_masks: dict[str, torch.Tensor] | None = None, statistics: dict | None = None,
                teacher: TextClassifier | None = None, rewind: bool = False,
                public: PublicDistillation | None = None, workdir: str | Path | None = None,
                on_step=None) -> RoundResult:
    """Round `round_index` of `schedule` on `model`, in place (see the module doc for the order).

    statistics: `{"input_norms", "second_moments"}` of the layer inputs (public, or a DP release), as the scorer
    and `schedule.reconstruct` need them. teacher: the DP teacher, to rewind to (`rewind`) and to distil from on
    public text (`public`). workdir: where the publicly distilled weights are kept, so that a round whose DP
    fine-tuning failed does not distil again on its rerun. Returns the masks (the caller holds masked weights at
    zero through the DP fine-tuning) and what each step measured.
    """
    statistics = statistics or {}
    if schedule.needs_statistics and not statistics:
        raise ValueError(f"scorer {schedule.scorer!r} / reconstruct needs statistics of the layer inputs")
    masks = prune_masks(model, sparsity=schedule.sparsity_after(round_index), include=schedule.include,
                        scope=schedule.scope, scorer=schedule.scorer, previous=previous_masks,
                        input_norms=statistics.get("input_norms"))
    if rewind:
        if teacher is None:
            raise ValueError("rewind needs the teacher")
        model.load_state_dict(teacher.state_dict())  # the masks are multiplied in before training
    errors = None
    if schedule.reconstruct:
        errors = reconstruct(model, masks, statistics["second_moments"], damping=schedule.reconstruct_damping)
    report = _distil_on_public(model, teacher, public, masks, workdir, on_step) if public else None
    return RoundResult(masks=masks, sparsity=sparsity_report(masks), reconstruction=errors, public_distill=report)


def _distil_on_public(model, teacher, public: PublicDistillation, masks, workdir, on_step) -> dict:
    if teacher is None:
        raise ValueError("public distillation needs the teacher")
    saved = Path(workdir) / "public_distilled.pt" if workdir is not None else None
    report = saved.with_name("public_distill.json") if saved is not None else None
    if saved is not None and saved.exists() and report.exists():
        model.load_state_dict(torch.load(saved, weights_only=True))
        return json.loads(report.read_text())
    result = public_distill(model, teacher, public.texts, config=public.config, targets=public.targets,
                            masks=masks, on_step=on_step)
    result = {"num_texts": len(public.texts["input_ids"]), **result, "config": vars(public.config)}
    if saved is not None:
        files.torch_save(model.state_dict(), saved)
        files.write_text(report, json.dumps(result, indent=2))
    return result
