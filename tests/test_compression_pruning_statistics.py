"""compression.pruning.statistics: DP input norms against a microbatch oracle (one example at a time, unpadded,
by hand),
chunk sharing between layers fed one tensor, and the noise entering the released norms."""
import math

import pytest
import torch

from compression.models import build_tiny
from compression.pruning.masks import prunable
from compression.pruning.statistics import _layer_inputs, dp_input_norms

INCLUDE = "encoder.encoder.layer."


def _data(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    ids = [torch.randint(5, 1000, (int(k),), generator=g).tolist() for k in lengths]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}


def _oracle_sums(model, data):
    """By hand: each example alone (no padding), every Linear's input x [L, d], token mean of x^2, each distinct
    input normalised to 1/sqrt(M), summed over examples. Keyed by weight name (shared inputs give equal sums)."""
    linears = {n[: -len(".weight")]: m for n in prunable(model, INCLUDE)
               for m in [dict(model.named_modules())[n[: -len(".weight")]]]}
    sums = {}
    for ids in data["input_ids"]:
        seen = {}
        hooks = [m.register_forward_hook(lambda m, i, o, n=n, seen=seen: seen.__setitem__(n, i[0][0].double()))
                 for n, m in linears.items()]
        x = torch.tensor([ids])
        with torch.no_grad():
            model(x, torch.ones_like(x), torch.zeros_like(x))
        for h in hooks:
            h.remove()
        stats = {n: v.pow(2).mean(0) for n, v in seen.items()}
        distinct = {n for n in stats if not any(stats[o] is not stats[n] and torch.equal(seen[o], seen[n])
                                                and o < n for o in stats)}
        for n, s in stats.items():
            sums[n + ".weight"] = sums.get(n + ".weight", 0) + s / s.norm() / math.sqrt(len(distinct))
    return sums


def test_noiseless_norms_match_a_microbatch_oracle_and_padding_is_excluded():
    model = build_tiny(num_layers=2, seed=0).eval()
    data = _data()
    got = dp_input_norms(model, data, include=INCLUDE, noise_multiplier=1e-9, batch_size=4,
                         generator=torch.Generator().manual_seed(0))
    oracle = _oracle_sums(model, data)
    assert set(got) == set(prunable(model, INCLUDE)) == set(oracle)
    for name in got:
        torch.testing.assert_close(got[name].double(), oracle[name].sqrt(), rtol=1e-5, atol=1e-7)


def test_query_key_value_share_one_chunk_and_other_inputs_do_not():
    model = build_tiny(num_layers=2, seed=1).eval()
    ids = torch.tensor([[7, 8, 9, 0], [5, 6, 0, 0]])
    mask = (ids != 0).long()
    chunks, owner = _layer_inputs(model, INCLUDE, ids, mask, torch.zeros_like(ids))
    layer = "encoder.encoder.layer.0."
    parts = ("attention.self.query", "attention.self.key", "attention.self.value")
    keys = {owner[layer + p + ".weight"] for p in parts}
    assert len(keys) == 1
    others = {owner[layer + p + ".weight"] for p in ("attention.output.dense", "intermediate.dense", "output.dense")}
    assert len(others) == 3 and not keys & others
    assert len(chunks) == 4 * 2 and all(c.shape[0] == 2 for c in chunks.values())  # 4 distinct inputs per layer


def test_released_norms_carry_noise_of_the_stated_scale():
    """Sums here are tiny (6 examples, norm <= 1 each) against sigma 3, so a released squared norm is about
    max(0, z) for z ~ N(0, 9): half the coordinates clamp to zero, the rest are half-normal (mean 3 sqrt(2/pi),
    mean square 9). Noise
    divided by n, or scaled by the number of chunks, fails."""
    model = build_tiny(num_layers=4, hidden_size=64, intermediate_size=256, seed=2).eval()
    noisy = dp_input_norms(model, _data(n=6, seed=3), include=INCLUDE, noise_multiplier=3.0, batch_size=8,
                           generator=torch.Generator().manual_seed(1))
    distinct = torch.cat([v for n, v in noisy.items() if ".self.key." not in n and ".self.value." not in n])
    assert distinct.numel() == 4 * (3 * 64 + 256)
    released = distinct[distinct > 0].double() ** 2  # the noisy sums that came out above zero
    assert released.numel() / distinct.numel() == pytest.approx(0.5, abs=0.06)
    assert float(released.mean()) == pytest.approx(3.0 * math.sqrt(2 / math.pi), rel=0.1)  # half-normal mean
    assert float((released ** 2).mean()) == pytest.approx(9.0, rel=0.2)
