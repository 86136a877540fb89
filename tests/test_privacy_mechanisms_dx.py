"""privacy.mechanisms.dx: the d_chi-privacy mechanism. The radius has the Gamma(d, 1/eta) law (mean and a
Kolmogorov-Smirnov test), directions are uniform, eta = inf is the identity, draws are secret by default and one per
example under a NoiseStream, and the registry never lets a dx release into a central composition."""
import math

import pytest
import torch
from scipy import stats

from privacy.accounting import DPEvent
from privacy.config import StageBudget
from privacy.ledger import LedgerEntry
from privacy.mechanisms import get_mechanism, require_composable
from privacy.mechanisms.dx import NoiseStream, mean_radius, privatize, sample_noise
from privacy.planning import StagePlan

DIM, ETA, DRAWS = 24, 3.0, 20_000


@pytest.fixture(scope="module")
def noise():
    return sample_noise((DRAWS, DIM), eta=ETA, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_mean_radius_is_d_over_eta(noise):
    radius = noise.norm(dim=1)
    expected = mean_radius(eta=ETA, dim=DIM)  # 8.0
    standard_error = math.sqrt(DIM) / ETA / math.sqrt(DRAWS)  # Gamma(d, 1/eta) has std sqrt(d) / eta
    assert expected == DIM / ETA
    assert abs(radius.mean().item() - expected) < 4 * standard_error


def test_radius_passes_a_kolmogorov_smirnov_test_against_gamma(noise):
    radius = noise.norm(dim=1).numpy()
    assert stats.kstest(radius, stats.gamma(a=DIM, scale=1 / ETA).cdf).pvalue > 0.01
    # the test has power: the same radii are rejected against a Gamma of the wrong shape or scale
    assert stats.kstest(radius, stats.gamma(a=DIM - 2, scale=1 / ETA).cdf).pvalue < 1e-6
    assert stats.kstest(radius, stats.gamma(a=DIM, scale=1.1 / ETA).cdf).pvalue < 1e-6


def test_directions_are_uniform_on_the_sphere(noise):
    unit = noise / noise.norm(dim=1, keepdim=True)
    # mean direction ~ 0: for n uniform unit vectors, n ||mean||^2 has expectation 1 (about chi2_d / d)
    assert DRAWS * unit.mean(0).pow(2).sum().item() < stats.chi2(DIM).ppf(0.999) / DIM
    # isotropic: every coordinate's second moment is 1/d
    torch.testing.assert_close(unit.pow(2).mean(0), torch.full((DIM,), 1 / DIM, dtype=torch.float64),
                               rtol=0.1, atol=0)
    # and the direction does not depend on the radius (the two halves by radius point the same ways)
    radius = noise.norm(dim=1)
    far = radius > radius.median()
    assert abs(unit[far].pow(2)[:, 0].mean() - unit[~far].pow(2)[:, 0].mean()) < 0.01


def test_infinite_eta_leaves_representations_unchanged_and_large_eta_nearly_so():
    x = torch.randn(5, 7, DIM)
    assert torch.equal(privatize(x, eta=math.inf, generator=torch.Generator().manual_seed(1)), x)
    moved = (privatize(x, eta=1e6, generator=torch.Generator().manual_seed(1)) - x).norm(dim=-1)
    assert moved.max() < 10 * DIM / 1e6


def test_one_eta_per_row():
    etas = torch.tensor([1.0, 10.0, math.inf]).repeat(4000)
    radius = sample_noise((len(etas), DIM), eta=etas, generator=torch.Generator().manual_seed(2)).norm(dim=1)
    means = radius.view(-1, 3).mean(0)
    torch.testing.assert_close(means[:2], torch.tensor([DIM / 1.0, DIM / 10.0]), rtol=0.02, atol=0)
    assert means[2] == 0
    with pytest.raises(ValueError, match="eta"):
        sample_noise((3, DIM), eta=torch.tensor([1.0, 0.0, 1.0]), generator=torch.Generator())


def test_noise_is_secret_by_default(monkeypatch):
    import privacy.noise

    calls = []
    real = privacy.noise.secret_seed
    monkeypatch.setattr(privacy.noise, "secret_seed", lambda: calls.append(1) or real())
    x = torch.zeros(3, DIM)
    first, second = privatize(x, eta=ETA), privatize(x, eta=ETA)
    assert len(calls) == 2 and not torch.equal(first, second)


def test_noise_stream_one_draw_per_example_and_a_secret_seed():
    stream = NoiseStream()
    assert not stream.seeded and "seed=" not in repr(stream).replace("seeded", "")

    def draw(s, namespace, index):
        return sample_noise((4, DIM), eta=ETA, generator=s.generator(namespace, index))

    assert torch.equal(draw(stream, "train", 3), draw(stream, "train", 3))  # a resend is the same release
    assert not torch.equal(draw(stream, "train", 3), draw(stream, "train", 4))
    assert not torch.equal(draw(stream, "train", 3), draw(stream, "dev", 3))
    assert not torch.equal(draw(stream, "train", 3), draw(NoiseStream(), "train", 3))  # fresh secret per stream
    assert NoiseStream(seed=5).seeded
    assert torch.equal(draw(NoiseStream(seed=5), "dev", 0), draw(NoiseStream(seed=5), "dev", 0))


def test_registry_reports_dx_beside_epsilon_and_nothing_composes_it():
    dx = get_mechanism("dx")
    assert dx.composes is False and "never composed" in dx.summary and "indistinguishability" in dx.summary
    event = DPEvent(noise_multiplier=1.0, sample_rate=1.0, num_steps=1)
    with pytest.raises(ValueError, match="never composed"):
        dx.check(event)
    with pytest.raises(ValueError, match="does not compose"):
        require_composable("dx")
    with pytest.raises(ValueError, match="never composed"):
        LedgerEntry(stage="split", noise_multiplier=1.0, sample_rate=1.0, num_steps=1, max_grad_norm=1.0,
                    epsilon_after=0.0, delta=1e-5, accountant="prv", mechanism="dx")
    with pytest.raises(ValueError, match="does not compose"):
        StagePlan(stage="split", sample_rate=1.0, num_steps=1, budget_share=1.0, mechanism="dx")
    with pytest.raises(ValueError, match="does not compose"):
        StageBudget(event=event, mechanism="dx", target_epsilon=8.0, delta=1e-5)
    assert require_composable("dp_sgd").composes and require_composable("gaussian_sum").composes
