"""Oracle tests for every PrivateModel mode (ghost, hooks, bk) and clipping (flat, per_layer): clipped sums against
one-example-at-a-time microbatches, per-example bounds, noise scale, masks held at zero, and bk's error paths."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privacy.bookkeeping_layers
from compression.data import pad
from compression.methods import make_trainable
from compression.methods.bitfit import BiasNormConfig
from compression.methods.full import FullConfig
from compression.models import build_tiny
from compression.train import apply_masks
from privacy.engine import PrivateModel

MODES_CLIPPINGS = [("ghost", "flat"), ("hooks", "flat"), ("hooks", "per_layer"), ("bookkeeping", "flat"),
                   ("bookkeeping", "per_layer")]


def _model(shape: str) -> nn.Module:
    if shape == "minilm":  # MiniLM-L6 layer shapes: hidden 384, 12 heads, intermediate 1536
        model = build_tiny(hidden_size=384, intermediate_size=1536, num_layers=1, num_heads=12, dropout=0.0, seed=1)
    else:
        model = build_tiny(seed=1, dropout=0.0)  # no dropout: the oracle and the engine see the same function
    make_trainable(model, (BiasNormConfig if shape == "bias_norm" else FullConfig)(layers=model.num_layers))
    if shape == "tiny_embeddings":
        model.encoder.embeddings.requires_grad_(True)
    return model


def _batch(n=6, seed=0, max_len=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len, (n,), generator=g)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in lengths]
    return ids, torch.randint(0, 2, (n,), generator=g)


def _forward(model, ids):
    input_ids, mask = pad(ids)
    return model(input_ids, mask, torch.zeros_like(input_ids))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _oracle_update(model, ids, labels, clip, clipping):
    """Sum over examples of each example's gradient clipped (whole, or per parameter tensor), one at a time."""
    params = _trainable(model)
    layer_clip = clip / math.sqrt(len(params))
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        grads = torch.autograd.grad(F.cross_entropy(_forward(model, [x]), y.view(1)), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (layer_clip, float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    return total


def _private(model, mode, clipping, **kw):
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "expected_batch_size": 1, **kw}
    return PrivateModel(model, torch.optim.SGD(_trainable(model), lr=1.0), mode=mode, clipping=clipping, **kw)


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("shape", ["tiny", "tiny_embeddings", "minilm", "bias_norm"])  # bias_norm: weights frozen
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_clipped_sum_matches_microbatch_oracle(mode, clipping, shape, clip):
    model = _model(shape)
    ids, labels = _batch()
    expected = _oracle_update(model, ids, labels, clip, clipping)
    before = [p.detach().clone() for p in _trainable(model)]
    private = _private(model, mode, clipping, max_grad_norm=clip, expected_batch_size=len(ids))
    for chunk in ([0, 1, 2, 3], [4, 5]):  # two physical chunks of one logical batch, padded to their longest
        private.backward(F.cross_entropy(_forward(model, [ids[i] for i in chunk]), labels[chunk], reduction="none"))
    private.step()
    private.close()
    for b, p, e in zip(before, _trainable(model), expected):
        torch.testing.assert_close(b - p.detach(), e / len(ids), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ghost_norm", [True, False])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bk_both_linear_norm_paths_match_oracle(monkeypatch, ghost_norm, clipping):
    monkeypatch.setattr(privacy.bookkeeping_layers, "use_ghost_norm", lambda **_: ghost_norm)
    model = _model("tiny_embeddings")
    ids, labels = _batch(n=5, seed=4)
    expected = _oracle_update(model, ids, labels, 0.02, clipping)
    before = [p.detach().clone() for p in _trainable(model)]
    private = _private(model, "bookkeeping", clipping, max_grad_norm=0.02, expected_batch_size=5)
    private.backward(F.cross_entropy(_forward(model, ids), labels, reduction="none"))
    private.step()
    for b, p, e in zip(before, _trainable(model), expected):
        torch.testing.assert_close(b - p.detach(), e / 5, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_each_contribution_is_within_its_bound(mode, clipping):
    model = _model("tiny")
    params = _trainable(model)
    ids, labels = _batch(n=4, seed=3)
    clip = 0.05
    layer_clip = clip / math.sqrt(len(params)) if clipping == "per_layer" else None
    private = _private(model, mode, clipping, max_grad_norm=clip)
    for i in range(len(ids)):  # one example per logical batch: the update is that example's clipped gradient
        before = [p.detach().clone() for p in params]
        private.backward(F.cross_entropy(_forward(model, [ids[i]]), labels[i : i + 1], reduction="none"))
        assert float(private.per_example_norms()[0]) > clip  # the bound is active
        private.step()
        parts = [float((b - p.detach()).norm()) for b, p in zip(before, params)]
        total = math.sqrt(sum(x * x for x in parts))
        assert total <= clip * (1 + 1e-4)
        if layer_clip is None:
            assert total == pytest.approx(clip, rel=1e-3)
        else:
            assert max(parts) <= layer_clip * (1 + 1e-4)
            assert max(parts) == pytest.approx(layer_clip, rel=1e-3)  # the largest part is clipped to C_l
    private.close()


@pytest.mark.parametrize("secure_mode", [False, True])
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_noise_has_std_sigma_times_clip_over_batch(mode, clipping, secure_mode):
    model = build_tiny(hidden_size=64, intermediate_size=256, seed=3)
    make_trainable(model, FullConfig(layers=2))
    params = _trainable(model)
    before = [p.detach().clone() for p in params]
    sigma, clip, batch = 1.7, 0.3, 4
    private = _private(model, mode, clipping, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=batch,
                       generator=torch.Generator().manual_seed(0), secure_mode=secure_mode)
    ids, _ = _batch(n=batch)
    private.backward(_forward(model, ids).sum(-1) * 0.0)  # zero loss: the update is pure noise
    private.step()
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    expected, n = sigma * clip / batch, noise.numel()
    assert n > 50_000
    assert float(noise.std()) == pytest.approx(expected, rel=4 / n**0.5 * 3)
    assert abs(float(noise.mean())) < 4 * expected / n**0.5


@pytest.mark.parametrize("params", ["all", "bias_norm"])
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_every_parameter_tensor_gets_noise_of_std_sigma_times_clip(mode, clipping, params):
    """Per tensor, not pooled: 60 noise-only steps give every trainable tensor (a 2-entry head bias too) >= 120
    draws, so a tensor left without noise, or with the wrong scale, fails here. Relative error of a sample std from
    N draws is ~1/sqrt(2N); the tolerance is six of those."""
    model = build_tiny(hidden_size=32, intermediate_size=64, seed=3)
    make_trainable(model, (BiasNormConfig if params == "bias_norm" else FullConfig)(layers=2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sigma, clip, batch, steps = 1.7, 0.3, 4, 60
    private = _private(model, mode, clipping, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=batch)
    draws = {n: [] for n in trainable}
    for _ in range(steps):  # an empty logical batch: the update is the noise alone
        before = {n: p.detach().clone() for n, p in trainable.items()}
        private.step()
        for n, p in trainable.items():
            draws[n].append((before[n] - p.detach()).flatten())
    private.close()
    expected = sigma * clip / batch
    assert any(p.dim() == 1 for p in trainable.values())
    for name, parts in draws.items():
        noise = torch.cat(parts)
        tolerance = 6 / (2 * noise.numel()) ** 0.5
        assert float(noise.pow(2).mean().sqrt()) == pytest.approx(expected, rel=tolerance), name


@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_seeded_noise_is_reproducible_and_empty_batch_steps(mode, clipping):
    updates = []
    for _ in range(2):
        model = _model("tiny")
        before = model.head.weight.detach().clone()
        private = _private(model, mode, clipping, noise_multiplier=1.0, expected_batch_size=2,
                           generator=torch.Generator().manual_seed(7))
        private.step()  # an empty logical batch still takes a noise-only step
        updates.append(before - model.head.weight.detach())
    assert float(updates[0].abs().sum()) > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=0, atol=0)


@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_masked_weights_stay_exactly_zero_through_noisy_steps(mode, clipping):
    model = _model("tiny")
    start = make_trainable(model, FullConfig(layers=1))
    name = f"encoder.encoder.layer.{start}.intermediate.dense.weight"
    weight = dict(model.named_parameters())[name]
    masks = {name: (torch.rand_like(weight) > 0.5).float()}
    apply_masks(model, masks)
    original = weight.detach().clone()
    ids, labels = _batch(n=8, seed=5)
    input_ids, mask = pad(ids)
    with torch.no_grad():
        hidden = model.embed(input_ids, mask, torch.zeros_like(input_ids), num_layers=start)
    private = _private(model, mode, clipping, noise_multiplier=2.0, expected_batch_size=8)
    for _ in range(3):
        for chunk in (slice(0, 5), slice(5, 8)):  # the loop calls classify on the unwrapped model
            logits = model.classify(hidden[chunk], mask[chunk], start_layer=start)
            private.backward(F.cross_entropy(logits, labels[chunk], reduction="none"))
        private.step()
        apply_masks(model, masks)
    private.close()
    weight = weight.detach()
    assert torch.all(weight[masks[name] == 0] == 0)
    assert not torch.equal(weight[masks[name] == 1], original[masks[name] == 1])  # the unmasked part trained


def test_bk_padding_contributes_nothing():
    model = _model("tiny_embeddings")
    ids, labels = _batch(n=4, seed=6)
    ids[0] = ids[0][:3]  # the shortest row: most padding
    private = _private(model, "bookkeeping", "flat")
    private.backward(F.cross_entropy(_forward(model, ids), labels, reduction="none"))
    padded = private.per_example_norms().clone()
    private.backward(F.cross_entropy(_forward(model, ids[:1]), labels[:1], reduction="none"))
    assert float(padded[0]) == pytest.approx(float(private.per_example_norms()[0]), rel=1e-5)


def test_bk_handles_plain_modules_and_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # ignored: neither clipped nor updated
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))  # 3-D input; the last layer sees 2-D
    def loss(rows):
        return F.cross_entropy(model(x[rows]).mean(1), y[rows], reduction="none")
    params = _trainable(model)
    oracle = [torch.zeros_like(p) for p in params]
    for i in range(6):
        grads = torch.autograd.grad(loss([i]).sum(), params)
        scale = min(1.0, 0.1 / (float(torch.sqrt(sum((g**2).sum() for g in grads))) + 1e-6))
        for o, g in zip(oracle, grads):
            o += scale * g
    bias = model[0].bias.detach().clone()
    before = [p.detach().clone() for p in params]
    private = _private(model, "bookkeeping", "flat", max_grad_norm=0.1, expected_batch_size=6)
    private.backward(loss(list(range(6))))
    private.step()
    private.close()
    assert torch.equal(bias, model[0].bias)
    for b, p, o in zip(before, params, oracle):
        torch.testing.assert_close(b - p.detach(), o / 6, rtol=1e-4, atol=1e-6)
    assert "forward" not in model[0].__dict__  # closed: plain modules again


def test_unsupported_combinations_raise_clear_errors():
    model = _model("tiny")
    with pytest.raises(ValueError, match="ghost.*flat"):
        _private(model, "ghost", "per_layer")
    with pytest.raises(ValueError, match="mode"):
        _private(model, "functorch", "flat")
    conv = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match=r"1\.weight.*Conv1d"):
        _private(conv, "bookkeeping", "flat")
    conv[1].requires_grad_(False)
    _private(conv, "bookkeeping", "flat").close()  # a frozen unsupported module is fine


def test_ghost_norm_rule_picks_the_cheaper_shape():
    rule = privacy.bookkeeping_layers.use_ghost_norm
    assert rule(seq_len=128, in_features=384, out_features=384)  # 128*768 < 384*384
    assert rule(seq_len=1, in_features=768, out_features=2)  # pooled head input: one position
    assert not rule(seq_len=128, in_features=768, out_features=2)  # tiny output, long sequence
    assert not rule(seq_len=512, in_features=384, out_features=384)


def test_bk_refuses_a_per_example_norm_that_is_not_one_per_example(monkeypatch):
    """A capture whose squared norms have shape [1] would broadcast one example's norm over the chunk (every example
    clipped by the same factor): bk must refuse it rather than clip wrongly."""
    class Broadcasting(privacy.bookkeeping_layers.LinearCapture):
        def __init__(self, module, x, grad, grams):
            super().__init__(module, x, grad, grams)
            self.sq_norms = {p: sq[:1] for p, sq in self.sq_norms.items()}

    rule = privacy.bookkeeping_layers.RULES[nn.Linear]
    layers = privacy.bookkeeping_layers
    monkeypatch.setitem(layers.RULES, nn.Linear, layers.Rule(rule.params, rule.forward, Broadcasting))
    model = nn.Sequential(nn.Linear(5, 3))
    private = _private(model, "bookkeeping", "flat")
    with pytest.raises(RuntimeError, match=r"shape \(1,\).*expected \[4\]"):
        private.backward(model(torch.randn(4, 5)).sum(-1))
    private.close()
