"""privacy.audit.inversion and compression.split.audit: without noise the nearest-neighbour attack at the embedding
split recovers every token and the learned (public-text) attack most of them deeper down; heavy d_chi noise drives
both to chance; the fast nearest-row search equals brute force; snapping sends vocabulary embeddings only."""
import math

import pytest
import torch

from compression.models import build_tiny
from compression.split import AttackConfig, Customer, DXConfig, SplitConfig, attack
from compression.split.customer import vocabulary_table
from privacy.audit.inversion import LinearInversion, PublicNeighbourInversion, nearest_rows
from privacy.mechanisms.dx import NoiseStream
from tests.test_compression_split import VOCAB, toy_data

SPECIAL = (0, 2, 3)


@pytest.fixture(scope="module")
def setting():
    return build_tiny(vocab_size=VOCAB, num_layers=2, seed=0), toy_data(100, 0), toy_data(600, 5)


def _attack(setting, *, split_layer: int, eta: float, kind: str, snap: bool = False):
    model, private, public = setting
    return attack(model, private, public, config=SplitConfig(split_layer=split_layer, dx=DXConfig(eta=eta, snap=snap)),
                  special_ids=SPECIAL, attack_config=AttackConfig(kind=kind), noise=NoiseStream(seed=0))


@pytest.mark.parametrize("snap", [False, True])
def test_nearest_neighbour_recovers_every_token_without_noise_at_the_embedding_split(setting, snap):
    result = _attack(setting, split_layer=0, eta=math.inf, kind="nearest", snap=snap)
    assert result.recovery >= 0.99 and result.empirical_privacy == pytest.approx(1 - result.recovery)
    assert result.num_tokens > 500


def test_heavy_noise_drives_nearest_neighbour_recovery_to_chance(setting):
    light = _attack(setting, split_layer=0, eta=10.0, kind="nearest")
    heavy = _attack(setting, split_layer=0, eta=0.01, kind="nearest")  # moves ~3200, embeddings are ~6 apart
    assert light.recovery > 0.9
    assert heavy.recovery < 3 * heavy.chance_uniform


@pytest.mark.parametrize("split_layer", [1, 2])
def test_learned_inversion_reads_deeper_splits_and_falls_to_chance_under_heavy_noise(setting, split_layer):
    clear = _attack(setting, split_layer=split_layer, eta=math.inf, kind="learned")
    heavy = _attack(setting, split_layer=split_layer, eta=0.01, kind="learned")
    assert clear.recovery > 0.9  # learned from public text only
    assert heavy.recovery < heavy.chance_majority + 0.03  # no better than guessing the public text's majority token
    for result in (clear, heavy):  # every learned attack ran; the result is the strongest
        assert set(result.candidates) == {"linear", "neighbour", "neighbour_clean"}
        assert result.recovery == max(result.candidates.values()) == result.candidates[result.attack]
    with pytest.raises(ValueError, match="embeddings"):
        _attack(setting, split_layer=split_layer, eta=math.inf, kind="nearest")


def test_nearest_rows_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    observed, candidates = torch.randn(700, 16, generator=generator), torch.randn(50, 16, generator=generator)
    expected = torch.cdist(observed, candidates).argmin(1)
    assert torch.equal(nearest_rows(observed, candidates, chunk_size=64), expected)


def test_linear_inversion_guesses_the_majority_on_uninformative_features():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor([3] * 60 + [1] * 30 + [2] * 10).repeat(30)
    inversion = LinearInversion(vocab_size=5).fit(torch.randn(len(tokens), 8, generator=generator), tokens)
    assert (inversion.predict(torch.randn(200, 8, generator=generator)) == 3).all()
    informative = torch.nn.functional.one_hot(tokens, 5).double() * 3
    assert torch.equal(LinearInversion(vocab_size=5).fit(informative, tokens).predict(informative), tokens)


def test_snapping_sends_vocabulary_embeddings_only(setting):
    model, private, _ = setting
    customer = Customer(model, split_layer=0, dx=DXConfig(eta=5.0, snap=True), noise=NoiseStream(seed=0))
    crossing = customer.crossing(private, torch.arange(8), namespace="train", labels=False)
    table = vocabulary_table(customer.bottom)
    for position in range(crossing.hidden.shape[1]):
        rows = crossing.hidden[crossing.attention_mask[:, position].bool(), position]
        distance = torch.cdist(rows, table(position), compute_mode="donot_use_mm_for_euclid_dist")
        assert distance.min(1).values.max() < 1e-5
    with pytest.raises(ValueError, match="snap"):
        Customer(model, split_layer=1, dx=DXConfig(eta=5.0, snap=True))


def test_a_held_out_text_is_attacked_and_public_representations_are_computed_once_per_depth(setting):
    from compression.split.audit import representations

    model, private, public = setting
    held_out = toy_data(40, 9)
    config = SplitConfig(split_layer=1, dx=DXConfig(eta=math.inf))
    bottom = Customer(model, split_layer=1, dx=DXConfig(eta=math.inf))
    clean = representations(bottom, public, special_ids=SPECIAL, max_tokens=2000)
    run = lambda **kw: attack(model, private, public, config=config, special_ids=SPECIAL, noise=NoiseStream(seed=0),
                              attack_config=AttackConfig(kind="learned", max_public_tokens=2000), **kw)
    fresh, cached = run(attacked=held_out), run(attacked=held_out, public_clean=clean)
    assert fresh == cached  # the same attack: the representations were the ones it would compute
    real = sum(len([t for t in ids if t not in SPECIAL]) for ids in held_out["input_ids"])
    assert fresh.num_tokens == real != run().num_tokens  # the held-out text's tokens, not the training text's


def test_public_neighbour_reads_clusters_a_linear_map_cannot_separate():
    """Token 1's representations lie on a ring around token 0's (two contexts each side): no linear map separates
    them, the nearest public representation does; under the mechanism it is the attack the split study reports."""
    generator = torch.Generator().manual_seed(0)
    angle = torch.rand(2000, generator=generator) * 2 * math.pi
    tokens = torch.randint(0, 2, (2000,), generator=generator)
    radius = torch.where(tokens == 1, 3.0, 0.0)
    features = torch.stack([radius * angle.cos(), radius * angle.sin()], 1) + 0.2 * torch.randn(2000, 2,
                                                                                              generator=generator)
    public, private = slice(0, 1500), slice(1500, None)
    neighbour = PublicNeighbourInversion().fit(features[public], tokens[public]).predict(features[private])
    linear = LinearInversion(vocab_size=2).fit(features[public], tokens[public]).predict(features[private])
    assert (neighbour == tokens[private]).double().mean() > 0.97
    assert (linear == tokens[private]).double().mean() < 0.7
    with pytest.raises(RuntimeError, match="before fit"):
        PublicNeighbourInversion().predict(features)
    with pytest.raises(ValueError, match="non-empty"):
        PublicNeighbourInversion().fit(features, tokens[:10])


def test_learned_attack_reports_the_strongest_of_its_candidates(setting):
    """Under moderate noise the three learned attacks differ; "learned" runs each (the same private draws: the
    customer's seeded test stream) and reports the best. Comparing noisy sends with clean public representations
    puts noise on one side of each distance only, so it beats the noisy public neighbour."""
    kinds = ("linear", "neighbour", "neighbour_clean")
    only = {kind: _attack(setting, split_layer=1, eta=2.0, kind=kind) for kind in kinds}
    assert all(result.candidates == {} and result.attack == kind for kind, result in only.items())
    every = _attack(setting, split_layer=1, eta=2.0, kind="learned")
    assert set(every.candidates) == set(kinds)
    assert every.recovery == max(every.candidates.values()) == every.candidates[every.attack]
    assert every.candidates["neighbour_clean"] == only["neighbour_clean"].recovery  # no noise on its reference side
    assert only["neighbour_clean"].recovery > only["neighbour"].recovery
    with pytest.raises(ValueError, match="kind must be one of"):
        AttackConfig(kind="knn")
