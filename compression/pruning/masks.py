"""Unstructured pruning: masks over chosen weight tensors (global, per tensor or per row), by a registry of scorers
(weight magnitude; Wanda, weight times input norm), and the schedule of rounds.

Masks are plain {0,1} tensors kept beside the model (not `torch.nn.utils.prune` re-parametrisation, which
Opacus hooks do not see); the training loop multiplies them in after every noisy step. Pure library.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from privacy import files

# (weight [out, in], its input feature norms [in] or None) -> scores; higher survives
Scorer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _wanda(weight: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||x_j||."""
    if input_norms is None:
        raise ValueError("scorer 'wanda' needs input_norms (see compression.pruning.statistics)")
    return weight.detach().abs() * input_norms.to(weight.dtype)[None, :]


SCORERS: dict[str, Scorer] = {"magnitude": lambda w, _: w.detach().abs(), "wanda": _wanda}
NEEDS_INPUT_NORMS = frozenset({"wanda"})   # scorers that need statistics of the layer inputs


@dataclass(frozen=True, kw_only=True)
class PruneSchedule:
    """Iterative magnitude pruning: `rounds` rounds, each bringing sparsity up to the schedule's next value, or an
    explicit list `sparsities` (one round each, increasing, e.g. [0.5, 0.7, 0.9]).

    scorer "magnitude": |W|; "wanda": |W_ij| * ||x_j||, input norms released with DP before each round
    at noise multiplier `stats_noise` (one Gaussian sum over the training set, sample rate 1). Its norms are
    comparable within a tensor only, so it needs scope "layer" (one threshold per tensor) or "row" (per output row).
    reconstruct: after masking, the surviving weights of each row absorb the pruned ones' output under the input
    second moments (`compression.pruning.reconstruct`), released with DP at `stats_noise` (the norms then come from the
    same release: one release per round either way).
    """

    target_sparsity: float = 0.5     # fraction of the selected weights that are zero after the last round
    rounds: int = 2
    sparsities: tuple[float, ...] | None = None   # explicit per-round sparsities; overrides the two above
    scope: Literal["global", "layer", "row"] = "global"   # one threshold over all tensors, per tensor, per row
    scorer: str = "magnitude"
    include: str | None = None   # name prefix of prunable tensors (2-D weights only); None: the family's layers
    stats_noise: float = 10.0   # noise multiplier of the input statistics' release (activation scorer, reconstruct)
    reconstruct: bool = False
    reconstruct_damping: float = 0.01   # ridge added to H, relative to its mean diagonal

    def __post_init__(self):
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.scope not in ("global", "layer", "row"):
            raise ValueError(f"scope must be 'global', 'layer' or 'row', got {self.scope!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {self.scorer!r}")
        if self.needs_input_norms and self.scope == "global":
            raise ValueError(f"scorer {self.scorer!r} needs scope 'layer' or 'row': its input norms are released "
                             "normalised per tensor, so scores are not comparable across tensors")
        if not self.stats_noise > 0:
            raise ValueError(f"stats_noise must be a noise multiplier > 0, got {self.stats_noise!r}")
        if not self.reconstruct_damping > 0:
            raise ValueError(f"reconstruct_damping must be > 0, got {self.reconstruct_damping!r}")
        if self.sparsities is not None:
            values = list(self.sparsities)
            if not values or any(not 0 < v < 1 for v in values) or values != sorted(set(values)):
                raise ValueError(f"sparsities must be increasing values in (0, 1), got {values}")

    @property
    def needs_input_norms(self) -> bool:
        return self.scorer in NEEDS_INPUT_NORMS

    @property
    def needs_statistics(self) -> bool:
        """Whether each round needs statistics of the layer inputs: from public calibration text, or else released from
        the private data before the round (a ledger stage of its own)."""
        return self.needs_input_norms or self.reconstruct

    @property
    def num_rounds(self) -> int:
        return len(self.sparsities) if self.sparsities is not None else self.rounds

    def sparsity_after(self, round_index: int) -> float:
        """Sparsity reached after round `round_index` (1-based): `sparsities[round_index - 1]`, else equal steps
        in kept fraction, geometrically, to `target_sparsity`."""
        if self.sparsities is not None:
            return self.sparsities[round_index - 1]
        keep = (1 - self.target_sparsity) ** (round_index / self.rounds)
        return 1 - keep


def prunable(model: nn.Module, include: str | None = None) -> dict[str, nn.Parameter]:
    """2-D weight tensors whose names start with `include`; None: the transformer layers' weights of a
    `TextClassifier` (`model.family.layer_prefix`, e.g. "encoder.encoder.layer." for BERT, "encoder.h." for GPT-2)."""
    include = model.family.layer_prefix if include is None else include
    return {n: p for n, p in model.named_parameters() if n.startswith(include) and p.dim() == 2}


def prune_masks(model: nn.Module, *, sparsity: float, include: str | None = None, scope: str = "global",
                    scorer: str = "magnitude", previous: dict[str, torch.Tensor] | None = None,
                    input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks that zero the lowest-scoring `sparsity` fraction of the selected weights: over all of them (scope
    "global"), within each tensor ("layer") or within each output row of each tensor ("row").

    Weights already pruned (`previous`) score -inf, so they stay pruned and count toward the target.
    input_norms: {weight name: [in] feature norms}, for scorer "wanda". include: as `prunable`.
    """
    params = prunable(model, include)
    if not params:
        raise ValueError(f"no 2-D parameters start with {include!r}")
    scores = {}
    for name, p in params.items():
        s = SCORERS[scorer](p, None if input_norms is None else input_norms[name]).float()
        if previous and name in previous:
            s = s.masked_fill(previous[name] == 0, float("-inf"))
        scores[name] = s
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = round(sparsity * flat.numel())
        threshold = _kth(flat, k)
        return {n: (s > threshold).float() for n, s in scores.items()}
    if scope == "row":
        return {n: _row_masks(s, sparsity) for n, s in scores.items()}
    return {n: (s > _kth(s.flatten(), round(sparsity * s.numel()))).float() for n, s in scores.items()}


def _kth(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (k >= 1); below every value when k == 0, so nothing is pruned."""
    return torch.kthvalue(values, k).values if k else torch.tensor(float("-inf"))


def _row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, keep all but the lowest `round(sparsity * in)` scores (ties broken by position)."""
    k = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores)
    if k:
        lowest = scores.argsort(dim=1, stable=True)[:, :k]
        mask.scatter_(1, lowest, 0.0)
    return mask


def sparsity_report(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor sparsity and the overall figure under the key "overall"."""
    report = {n: 1 - float(m.mean()) for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    report["overall"] = 1 - sum(float(m.sum()) for m in masks.values()) / total if total else 0.0
    return report


def save_masks(masks: dict[str, torch.Tensor], path) -> None:
    files.torch_save({n: m.bool() for n, m in masks.items()}, path)


def load_masks(path) -> dict[str, torch.Tensor]:
    return {n: m.float() for n, m in torch.load(path, weights_only=True).items()}
