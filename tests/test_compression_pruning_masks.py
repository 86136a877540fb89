import pytest
import torch

from compression.models import build_tiny
from compression.pruning.masks import PruneSchedule, load_masks, prunable, prune_masks, save_masks, sparsity_report

INCLUDE = "encoder.encoder.layer."


def test_global_masks_hit_target_and_remove_smallest_weights():
    model = build_tiny(seed=0)
    masks = prune_masks(model, sparsity=0.5, include=INCLUDE)
    assert sparsity_report(masks)["overall"] == pytest.approx(0.5, abs=1e-3)
    params = prunable(model, INCLUDE)
    kept = torch.cat([params[n].detach().abs()[m == 1] for n, m in masks.items()])
    pruned = torch.cat([params[n].detach().abs()[m == 0] for n, m in masks.items()])
    assert float(pruned.max()) <= float(kept.min())
    assert set(masks) == set(params) and all(p.dim() == 2 for p in params.values())
    assert not any("embeddings" in n or "head" in n for n in masks)


def test_layer_scope_prunes_every_tensor_to_target():
    model = build_tiny(seed=1)
    masks = prune_masks(model, sparsity=0.3, include=INCLUDE, scope="layer")
    for name, value in sparsity_report(masks).items():
        assert value == pytest.approx(0.3, abs=0.02), name


def test_iterative_rounds_keep_earlier_pruning_and_follow_schedule():
    model = build_tiny(seed=2)
    schedule = PruneSchedule(target_sparsity=0.75, rounds=2)
    assert schedule.sparsity_after(1) == pytest.approx(0.5)
    assert schedule.sparsity_after(2) == pytest.approx(0.75)
    first = prune_masks(model, sparsity=schedule.sparsity_after(1), include=INCLUDE)
    with torch.no_grad():  # weights move between rounds; pruned ones must stay pruned anyway
        for name, p in prunable(model, INCLUDE).items():
            p.add_(torch.randn_like(p))
            p.mul_(first[name])
    second = prune_masks(model, sparsity=schedule.sparsity_after(2), include=INCLUDE, previous=first)
    for name in first:
        assert torch.all(second[name][first[name] == 0] == 0)
    assert sparsity_report(second)["overall"] == pytest.approx(0.75, abs=1e-3)


def test_zero_sparsity_keeps_everything_and_bad_settings_fail(tmp_path):
    model = build_tiny(seed=3)
    masks = prune_masks(model, sparsity=0.0, include=INCLUDE)
    assert sparsity_report(masks)["overall"] == 0.0
    save_masks(masks, tmp_path / "m.pt")
    assert all(torch.equal(masks[n], m) for n, m in load_masks(tmp_path / "m.pt").items())
    with pytest.raises(ValueError, match="target_sparsity"):
        PruneSchedule(target_sparsity=1.0)
    with pytest.raises(ValueError, match="no 2-D parameters"):
        prune_masks(model, sparsity=0.5, include="nothing.")


def test_explicit_sparsities_give_one_round_each_and_hit_each_target():
    config = PruneSchedule(sparsities=(0.5, 0.7, 0.9))
    assert config.num_rounds == 3 and [config.sparsity_after(r) for r in (1, 2, 3)] == [0.5, 0.7, 0.9]
    model, masks = build_tiny(seed=3), None
    for r in (1, 2, 3):
        masks = prune_masks(model, sparsity=config.sparsity_after(r), include=INCLUDE, previous=masks)
        assert sparsity_report(masks)["overall"] == pytest.approx(config.sparsity_after(r), abs=1e-3)
    for bad in ((0.7, 0.5), (0.5, 1.0), ()):
        with pytest.raises(ValueError, match="sparsities must be increasing"):
            PruneSchedule(sparsities=bad)


def test_row_scope_prunes_every_output_row_to_target_and_keeps_earlier_pruning():
    model = build_tiny(seed=4)
    first = prune_masks(model, sparsity=0.25, include=INCLUDE, scope="row")
    second = prune_masks(model, sparsity=0.5, include=INCLUDE, scope="row", previous=first)
    params = prunable(model, INCLUDE)
    for name, mask in second.items():
        per_row = 1 - mask.mean(dim=1)
        torch.testing.assert_close(per_row, torch.full_like(per_row, round(0.5 * mask.shape[1]) / mask.shape[1]))
        assert torch.all(mask[first[name] == 0] == 0)
        w = params[name].detach().abs()
        new = (first[name] == 1) & (mask == 0)  # pruned this round: each below every weight its row keeps
        for r in range(w.shape[0]):
            if new[r].any():
                assert float(w[r][new[r]].max()) <= float(w[r][mask[r] == 1].min())


def test_activation_scores_weight_times_input_norm():
    """Wanda's score |W_ij| * ||x_j||: a column whose input norm is zero goes first, whatever its weights, and
    with equal norms it reduces to magnitude (within each tensor)."""
    model = build_tiny(seed=5)
    params = prunable(model, INCLUDE)
    ones = {n: torch.ones(p.shape[1]) for n, p in params.items()}
    assert all(torch.equal(a, b) for a, b in zip(
        prune_masks(model, sparsity=0.4, include=INCLUDE, scope="layer", scorer="wanda",
                        input_norms=ones).values(),
        prune_masks(model, sparsity=0.4, include=INCLUDE, scope="layer").values()))
    dead = {n: v.clone().index_fill_(0, torch.tensor([0, 3]), 0.0) for n, v in ones.items()}
    masks = prune_masks(model, sparsity=0.4, include=INCLUDE, scope="row", scorer="wanda",
                            input_norms=dead)
    for name, mask in masks.items():
        assert not mask[:, [0, 3]].any(), name
    with pytest.raises(ValueError, match="needs input_norms"):
        prune_masks(model, sparsity=0.4, include=INCLUDE, scope="row", scorer="wanda")


def test_activation_scorer_needs_a_per_tensor_scope_and_positive_noise():
    assert PruneSchedule(scorer="wanda", scope="row").needs_input_norms
    assert not PruneSchedule().needs_input_norms
    with pytest.raises(ValueError, match="needs scope 'layer' or 'row'"):
        PruneSchedule(scorer="wanda")
    with pytest.raises(ValueError, match="stats_noise"):
        PruneSchedule(scorer="wanda", scope="layer", stats_noise=0.0)
    with pytest.raises(ValueError, match="scope must be"):
        PruneSchedule(scope="column")
