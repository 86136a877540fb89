"""privacy.mechanisms.gaussian_sum: the Gaussian sum mechanism. Normalisation bounds one example's contribution
(the sensitivity),
the noise has the stated scale, and the release is one-shot. Each test fails if its part is wrong."""
import math

import pytest
import torch

from privacy.mechanisms.gaussian_sum import GaussianSum, SecondMomentSum, normalise


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
        return torch.cat(list(total._sums.values()))

    with_one = noiseless([torch.cat([b, e]) for b, e in zip(base, extra)])
    assert float((with_one - noiseless(base)).norm()) == pytest.approx(1.0, abs=1e-9)


def test_release_adds_gaussian_noise_of_std_sigma_per_coordinate():
    """Noise scale against the mechanism's definition: sensitivity 1, so std sigma (a wrong scale, e.g. sigma
    times the number of chunks or sigma / sqrt(n), fails by far more than the 3% tolerance)."""
    chunks = _batch(50, dims=(4000, 6000))
    exact = GaussianSum(["a", "b"])
    exact.add(chunks)
    expected = torch.cat(list(exact._sums.values()))
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


def _tokens(n, length, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, d, generator=g)
    mask = torch.ones(n, length)
    mask[0, length // 2:] = 0  # one example is padded: its padding must not count
    x[0, length // 2:] = 1e3   # (and carries garbage there)
    return x, mask


def test_second_moments_match_per_example_matrices_built_by_hand():
    """Oracle: for each example alone, the token mean of x x^T over its real tokens, scaled to Frobenius norm
    (1 - SLACK) / sqrt(M), summed. The batched Gram-norm path must equal it."""
    inputs = {k: _tokens(5, 6, d, seed) for k, d, seed in (("a", 4, 0), ("b", 7, 1))}
    total = SecondMomentSum(["a", "b"])
    total.add({k: x for k, (x, _) in inputs.items()}, inputs["a"][1])
    bound = (1 - SecondMomentSum.SLACK) / math.sqrt(2)
    for key, (x, mask) in inputs.items():
        expected = 0
        for i in range(5):
            real = x[i][mask[i] == 1].double()
            m = real.T @ real / len(real)
            expected = expected + m * bound / torch.linalg.matrix_norm(m)
        torch.testing.assert_close(total._sums[key], expected, rtol=1e-5, atol=1e-7)


def test_one_example_moves_the_second_moment_sums_by_at_most_one():
    base = {k: _tokens(8, 5, 6, s) for k, s in (("a", 2), ("b", 3))}
    extra = {k: _tokens(1, 5, 6, s) for k, s in (("a", 4), ("b", 5))}

    def noiseless(parts):
        total = SecondMomentSum(["a", "b"])
        for part in parts:
            total.add({k: x for k, (x, _) in part.items()}, part["a"][1])
        return total._sums

    without, with_one = noiseless([base]), noiseless([base, {k: (1e4 * x, m) for k, (x, m) in extra.items()}])
    change = math.sqrt(sum(float(torch.linalg.matrix_norm(with_one[k] - without[k])) ** 2 for k in without))
    assert 1 - 2e-3 < change <= 1.0


def test_second_moment_release_is_symmetric_with_std_sigma_noise():
    x, mask = _tokens(4, 5, 120, 6)
    exact = SecondMomentSum(["a"])
    exact.add({"a": x}, mask)
    clean = exact._sums["a"].clone()
    total = SecondMomentSum(["a"])
    total.add({"a": x}, mask)
    released = total.release(noise_multiplier=2.0, generator=torch.Generator().manual_seed(0))["a"]
    torch.testing.assert_close(released, released.T, rtol=0, atol=0)
    noise = (released - clean)[torch.triu_indices(120, 120)[0], torch.triu_indices(120, 120)[1]]
    assert float(noise.std()) == pytest.approx(2.0, rel=0.03) and abs(float(noise.mean())) < 0.1
    with pytest.raises(RuntimeError, match="already called"):
        total.release(noise_multiplier=2.0)


def test_noiseless_sums_are_for_public_data_only():
    """Private accumulators refuse to hand out their plain sums; public ones (calibration text) return them."""
    x, mask = _tokens(3, 4, 5, 7)
    for private, public in ((GaussianSum(["a"]), GaussianSum(["a"], public=True)),
                            (SecondMomentSum(["a"]), SecondMomentSum(["a"], public=True))):
        for total in (private, public):
            if isinstance(total, GaussianSum):
                total.add([x.mean(1)])
            else:
                total.add({"a": x}, mask)
        with pytest.raises(PermissionError, match="may not leave"):
            private.noiseless()
        assert public.noiseless()["a"].shape in ((5,), (5, 5))
