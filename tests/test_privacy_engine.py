"""Oracle tests for the DP engine: clipped sums against one-example-at-a-time microbatches, noise scale,
Poisson sampling, and masks held at zero through noisy steps."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from compression.data import pad
from compression.methods import make_trainable
from compression.methods.bitfit import BiasNormConfig
from compression.methods.full import FullConfig
from compression.models import build_tiny
from compression.train import TrainConfig, dp_train
from privacy.engine import PoissonSampler, PrivateModel


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in lengths]
    labels = torch.randint(0, 2, (n,), generator=g)
    return ids, labels


def _forward(model, ids):
    input_ids, mask = pad(ids)
    return model(input_ids, mask, torch.zeros_like(input_ids))


def _oracle_update(model, ids, labels, clip):
    """Sum over examples of each example's gradient clipped to norm `clip`, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        loss = F.cross_entropy(_forward(model, [x]), y.view(1))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += scale * g
    return total


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("trainable_layers", [0, 2])
def test_clipped_sum_matches_microbatch_oracle(clip, trainable_layers):
    model = build_tiny(seed=1, dropout=0.0)  # no dropout: the oracle and the engine see the same function
    make_trainable(model, FullConfig(layers=trainable_layers))
    ids, labels = _batch()
    expected = _oracle_update(model, ids, labels, clip)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    private = PrivateModel(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                           noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(ids))
    for chunk in ([0, 1, 2, 3], [4, 5]):  # two physical chunks, one logical batch
        logits = _forward(model, [ids[i] for i in chunk])
        private.backward(F.cross_entropy(logits, labels[chunk], reduction="none"))
    private.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    for b, a, e in zip(before, after, expected):
        torch.testing.assert_close(b - a, e / len(ids), rtol=1e-4, atol=1e-6)
    if clip < 1:  # every contribution had norm exactly C, so the sum has norm <= n*C
        total_norm = torch.sqrt(sum(((b - a) ** 2).sum() for b, a in zip(before, after))) * len(ids)
        assert float(total_norm) <= len(ids) * clip * (1 + 1e-4)


def test_each_example_is_clipped_to_the_bound():
    model = build_tiny(seed=2, dropout=0.0)
    make_trainable(model, FullConfig(layers=2))
    ids, labels = _batch(n=5, seed=3)
    clip = 0.05
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(ids)):  # one example per logical batch: the update is that example's clipped gradient
        before = [p.detach().clone() for p in params]
        private = PrivateModel(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                               max_grad_norm=clip, expected_batch_size=1)
        private.backward(F.cross_entropy(_forward(model, [ids[i]]), labels[i : i + 1], reduction="none"))
        assert float(private.per_example_norms()[0]) > clip  # the bound is active
        private.step()
        private.close()
        delta = torch.sqrt(sum(((b - p.detach()) ** 2).sum() for b, p in zip(before, params)))
        assert float(delta) == pytest.approx(clip, rel=1e-3)


def test_noise_has_std_sigma_times_clip_over_batch():
    model = build_tiny(hidden_size=64, intermediate_size=256, seed=3)
    make_trainable(model, FullConfig(layers=2))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    sigma, clip, batch = 1.7, 0.3, 4
    private = PrivateModel(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                           expected_batch_size=batch, generator=torch.Generator().manual_seed(0))
    ids, _ = _batch(n=batch)
    private.backward(_forward(model, ids).sum(-1) * 0.0)  # zero loss: the update is pure noise
    private.step()
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    expected = sigma * clip / batch
    n = noise.numel()
    assert n > 50_000
    assert float(noise.std()) == pytest.approx(expected, rel=4 / n**0.5 * 3)
    assert abs(float(noise.mean())) < 4 * expected / n**0.5


def test_empty_batch_still_takes_a_noise_step():
    model = build_tiny(seed=4)
    make_trainable(model, FullConfig(layers=0))
    before = model.head.weight.detach().clone()
    private = PrivateModel(model, torch.optim.SGD(model.head.parameters(), lr=1.0), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=2)
    private.step()
    assert not torch.equal(before, model.head.weight.detach())


def _random_data(n, seed=0):
    ids, labels = _batch(n=n, seed=seed)
    return {"input_ids": [x.tolist() for x in ids], "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}


def test_realised_batch_sizes_match_the_accounted_sample_rate():
    """Over a run of dp_train, the examples drawn add up to q * n * steps within 4.5 standard deviations (a sum of
    n * steps Bernoulli(q) draws); sampling at another rate than the accountant's q fails here."""
    n, config = 1000, TrainConfig(epochs=1, batch_size=50, physical_batch_size=64)
    q, steps = config.sample_rate(n), config.num_steps(n)
    sizes = []
    dp_train(build_tiny(seed=7), _random_data(n, seed=7), config=config, method=FullConfig(layers=0),
             noise_multiplier=1.0,
             on_step=lambda step, metrics: sizes.append(metrics["batch_size"]))
    assert len(sizes) == steps == 20
    mean, sd = q * n * steps, (n * steps * q * (1 - q)) ** 0.5
    assert abs(sum(sizes) - mean) <= 4.5 * sd, (sum(sizes), mean, sd)
    assert len(set(sizes)) > 3  # Poisson: the batch size varies


def test_empty_poisson_batches_take_noise_only_steps():
    """At q = 1/400 about a third of the draws are empty; each is a step of noise alone (not skipped, not redrawn:
    the accountant counts every step at rate q)."""
    model = build_tiny(seed=8)
    heads, sizes = [], []

    def on_step(step, metrics):
        sizes.append(metrics["batch_size"])
        heads.append(model.head.weight.detach().clone())

    config = TrainConfig(epochs=0.05, batch_size=1, physical_batch_size=8)
    dp_train(model, _random_data(400, seed=8), config=config, method=FullConfig(layers=0), noise_multiplier=1.0,
             on_step=on_step)
    assert len(sizes) == config.num_steps(400) == 20 and 0 in sizes
    first_empty = sizes.index(0)
    previous = heads[first_empty - 1] if first_empty else None
    assert previous is None or not torch.equal(previous, heads[first_empty])  # the noise moved the weights


def test_poisson_sampler_rate_and_reproducibility():
    a = PoissonSampler(num_examples=2000, sample_rate=0.05, num_steps=200, seed=7)
    sizes = [len(ix) for ix in a]
    mean = sum(sizes) / len(sizes)
    assert mean == pytest.approx(100, rel=0.05)
    assert len(set(sizes)) > 5  # batch sizes vary: sampling is Poisson, not fixed-size
    b = PoissonSampler(num_examples=2000, sample_rate=0.05, num_steps=200, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(PoissonSampler(num_examples=2000, sample_rate=0.05,
                                                                num_steps=200, seed=7), b))
    with pytest.raises(ValueError):
        PoissonSampler(num_examples=10, sample_rate=0.0, num_steps=1, seed=0)


def test_masked_weights_stay_exactly_zero_through_noisy_steps():
    model = build_tiny(seed=5)
    ids, labels = _batch(n=40, seed=5)
    data = {"input_ids": [x.tolist() for x in ids], "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}
    name = "encoder.encoder.layer.1.intermediate.dense.weight"
    weight = dict(model.named_parameters())[name]
    mask = (torch.rand_like(weight) > 0.5).float()
    original = copy.deepcopy(weight.detach())
    dp_train(model, data, config=TrainConfig(epochs=2, batch_size=10, physical_batch_size=4),
             method=FullConfig(layers=2), noise_multiplier=2.0, masks={name: mask})
    weight = dict(model.named_parameters())[name].detach()
    assert torch.all(weight[mask == 0] == 0)
    assert not torch.equal(weight[mask == 1], original[mask == 1])  # the unmasked part did train


def test_bias_norm_trains_only_biases_layernorm_and_the_head():
    model = build_tiny(seed=6)
    ids, labels = _batch(n=40, seed=6)
    data = {"input_ids": [x.tolist() for x in ids], "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}
    assert make_trainable(model, BiasNormConfig(layers=1)) == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters()
                         if n.startswith("head.") or (n.startswith("encoder.encoder.layer.1.") and p.dim() == 1)}
    assert any("LayerNorm" in n for n in trainable) and any(n.endswith("dense.bias") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp_train(model, data, config=TrainConfig(epochs=2, batch_size=10, physical_batch_size=4, encoder_learning_rate=0.5),
             method=BiasNormConfig(layers=2),
             noise_multiplier=1.0)
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        in_top_two = name.startswith(("encoder.encoder.layer.0.", "encoder.encoder.layer.1."))
        assert moved == (name.startswith("head.") or (in_top_two and p.dim() == 1)), name
    with pytest.raises(ValueError, match="unknown method 'weights'"):
        make_trainable(model, dataclasses.replace(BiasNormConfig(), name="weights"))


class _FunctionalUse(torch.nn.Module):
    """A trainable Linear whose weight is applied with a bare `F.linear` (as a LoRA matrix might be), bypassing the
    module's forward where the engines capture per-example quantities; `also_module` also calls the module itself."""

    def __init__(self, also_module: bool):
        super().__init__()
        self.inner, self.head, self.also_module = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), also_module

    def forward(self, x):
        hidden = F.linear(x, self.inner.weight, self.inner.bias)
        return self.head(hidden + self.inner(x) if self.also_module else hidden)


@pytest.mark.parametrize("also_module", [
    False,
    pytest.param(True, id="also_module"),  # partly covered: the captured quantities miss the functional use
])
@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_a_parameter_used_outside_its_module_is_refused(mode, also_module):
    """Without the check, book-keeping silently drops the functional use from the update (noise only for `inner`
    alone) and ghost clipping computes norms that miss it (opacus #820's failure): the engine must refuse."""
    if mode == "ghost" and also_module:
        pytest.xfail("ghost clipping keeps norms only: a use partly outside the module is not detected")
    torch.manual_seed(0)
    model = _FunctionalUse(also_module)
    private = PrivateModel(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=1.0, expected_batch_size=5, mode=mode)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match=r"trainable parameter inner\.(weight|bias)"):
        private.backward(F.cross_entropy(private.module(x), y, reduction="none"))
    private.close()


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_a_parameter_that_did_not_run_is_refused(mode):
    """A trainable module that is not in the forward gets no per-example quantities: refused, by name."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
    private = PrivateModel(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=1.0, expected_batch_size=5, mode=mode)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match=r"trainable parameter unused\.(weight|bias)"):
        private.backward(F.cross_entropy(model["used"](x), y, reduction="none"))
    private.close()
