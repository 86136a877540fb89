"""privacy.stats: the Gaussian sum mechanism. Normalisation bounds one example's contribution (the sensitivity),
the noise has the stated scale, and the release is one-shot. Each test fails if its part is wrong."""
import math

import pytest
import torch

from privacy.stats import GaussianSum, normalise


def _batch(n, dims=(3, 5), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.rand(n, d, generator=g) for d in dims]


def test_normalise_gives_every_example_norm_one_split_evenly_over_chunks():
    chunks = _batch(7, dims=(3, 5, 11))
    chunks[1][2] = 0  # one example's chunk is all zero: it stays zero
    unit = normalise(chunks)
    per_chunk = torch.stack([u.norm(dim=1) for u in unit])  # [chunks, examples]
    expected = torch.full_like(per_chunk, 1 / math.sqrt(3))
    expected[1, 2] = 0
    torch.testing.assert_close(per_chunk, expected, rtol=0, atol=1e-12)
    # directions are kept: each chunk is a positive multiple of the input
    for u, c in zip(unit, chunks):
        torch.testing.assert_close(u * c.double().norm(dim=1, keepdim=True), c.double() * u.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_adding_one_example_moves_the_noiseless_sum_by_at_most_one(scale):
    """Sensitivity under add/remove-one: the sum over D and over D plus one example, whatever that example's
    scale, differ by exactly norm 1 (the bound the accountant assumes)."""
    base = _batch(20, seed=1)
    extra = _batch(1, seed=2, scale=scale)

    def noiseless(chunks):
        total = GaussianSum(["a", "b"])
        total.add(chunks)
        return torch.cat(total._sums)

    with_one = noiseless([torch.cat([b, e]) for b, e in zip(base, extra)])
    assert float((with_one - noiseless(base)).norm()) == pytest.approx(1.0, abs=1e-9)


def test_release_adds_gaussian_noise_of_std_sigma_per_coordinate():
    """Noise scale against the mechanism's definition: sensitivity 1, so std sigma (a wrong scale, e.g. sigma
    times the number of chunks or sigma / sqrt(n), fails by far more than the 3% tolerance)."""
    chunks = _batch(50, dims=(4000, 6000))
    exact = GaussianSum(["a", "b"])
    exact.add(chunks)
    expected = torch.cat(exact._sums)
    total = GaussianSum(["a", "b"])
    for part in range(0, 50, 16):  # batches add up to the same sum
        total.add([c[part:part + 16] for c in chunks])
    assert total.count == 50
    released = total.release(noise_multiplier=2.5, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([released["a"], released["b"]]).double() - expected
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.1)
    assert float(noise.std()) == pytest.approx(2.5, rel=0.03)


def test_release_is_one_shot_and_validates():
    total = GaussianSum(["a"])
    with pytest.raises(ValueError, match="nothing to release"):
        total.release(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="expected 1 chunks"):
        total.add(_batch(2))
    total.add(_batch(2, dims=(3,)))
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        total.release(noise_multiplier=0.0)
    with pytest.raises(ValueError, match="secure_mode"):
        total.release(noise_multiplier=1.0, secure_mode=True, generator=torch.Generator())
    out = total.release(noise_multiplier=1.0, secure_mode=True)
    assert out["a"].shape == (3,) and out["a"].dtype == torch.float32
    with pytest.raises(RuntimeError, match="already called"):
        total.release(noise_multiplier=1.0)
    with pytest.raises(TypeError):
        GaussianSum(["a"]).release(1.0)  # keyword-only
