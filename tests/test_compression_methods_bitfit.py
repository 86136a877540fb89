"""Method `bitfit`: only biases (and the head) train, and a DP step's clipped sum equals one-example-at-a-time oracle
gradients in every engine mode (float64: exact up to rounding)."""
import math

import pytest
import torch
import torch.nn.functional as F

from compression.data import pad
from compression.methods import stage_plan
from compression.methods.bitfit import BitFitConfig
from compression.models import build_tiny
from privacy.engine import PrivateModel

MODES_CLIPPINGS = [("ghost", "flat"), ("hooks", "flat"), ("hooks", "per_layer"), ("bookkeeping", "flat"),
                   ("bookkeeping", "per_layer")]


def _forward(model, ids):
    input_ids, mask = pad(ids)
    return model(input_ids, mask, torch.zeros_like(input_ids))


def _oracle_update(model, params, ids, labels, clip, clipping):
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        grads = torch.autograd.grad(F.cross_entropy(_forward(model, [x]), y.view(1)), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (clip / math.sqrt(len(params)), float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    return total


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_dp_step_matches_the_microbatch_oracle(mode, clipping, clip):
    model = build_tiny(dropout=0.0, seed=3).double()
    stage_plan(model, BitFitConfig(layers=1))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"head.weight", "head.bias"} | {n for n, _ in model.named_parameters()
                                                    if n.startswith("encoder.encoder.layer.1.") and n.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in torch.randint(3, 9, (6,), generator=g)]
    labels = torch.randint(0, 2, (6,), generator=g)
    expected = _oracle_update(model, params, ids, labels, clip, clipping)
    before = [p.detach().clone() for p in params]
    private = PrivateModel(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                           expected_batch_size=len(ids), mode=mode, clipping=clipping)
    for chunk in ([0, 1, 2, 3], [4, 5]):
        private.backward(F.cross_entropy(_forward(model, [ids[i] for i in chunk]), labels[chunk], reduction="none"))
    private.step()
    private.close()
    scale = max(float(e.abs().max()) for e in expected) / len(ids)  # key biases: zero gradient up to rounding
    for b, p, e in zip(before, params, expected):
        torch.testing.assert_close(b - p.detach(), e / len(ids), rtol=1e-7,
                                   atol=1e-7 * max(float(e.abs().max()) / len(ids), 1e-6 * scale))
