"""compression.split.contributing: class-conditional TF-IDF finds the label's tokens, contributing tokens get less
noise, the average eta over the training tokens is the configured one, and the switch turns it all off."""
import math

import pytest
import torch

from compression.models import build_tiny
from compression.split import CTIConfig, Customer, DXConfig
from compression.split.contributing import eta_levels, fit_token_etas, token_scores
from privacy.mechanisms.dx import NoiseStream
from tests.test_compression_split import MARKERS, VOCAB, toy_data

ETA = 20.0


@pytest.fixture(scope="module")
def train():
    return toy_data(200, 0)


def test_class_conditional_tfidf_ranks_the_label_markers_first(train):
    scores = token_scores(train["input_ids"], train["labels"], vocab_size=VOCAB)
    assert set(scores.argsort(descending=True)[:2].tolist()) == set(MARKERS)
    assert scores[2] == 0 and scores[3] == 0  # [CLS] and [SEP] are in every example: idf 0
    # a token as frequent as a marker but independent of the label scores low: the score is a class contrast
    common = [[*ids[:-1], 7, 7, ids[-1]] if i % 2 else ids for i, ids in enumerate(train["input_ids"])]
    scores = token_scores(common, train["labels"], vocab_size=VOCAB)
    assert scores[7] < scores[list(MARKERS)].min() / 4
    with pytest.raises(ValueError, match="regression"):
        token_scores(train["input_ids"], train["labels"].float(), vocab_size=VOCAB)


@pytest.mark.parametrize("num_tokens, eta_ratio", [(2, 4.0), (10, 2.0), (40, 8.0)])
def test_the_average_eta_over_training_tokens_is_preserved(train, num_tokens, eta_ratio):
    levels = fit_token_etas(train["input_ids"], train["labels"], eta=ETA, vocab_size=VOCAB,
                            config=CTIConfig(enabled=True, num_tokens=num_tokens, eta_ratio=eta_ratio))
    per_token = levels(torch.tensor([t for ids in train["input_ids"] for t in ids]))
    assert per_token.mean().item() == pytest.approx(ETA, rel=1e-9)
    assert levels.eta_contributing / levels.eta_other == pytest.approx(eta_ratio)
    assert levels.eta_contributing > ETA > levels.eta_other
    assert levels.contributing[list(MARKERS)].all() and int(levels.contributing.sum()) == num_tokens


def test_eta_levels_edge_cases():
    assert eta_levels(eta=ETA, eta_ratio=3.0, fraction=0.0) == (3 * ETA, ETA)
    assert eta_levels(eta=ETA, eta_ratio=3.0, fraction=1.0) == (ETA, ETA / 3)
    assert eta_levels(eta=math.inf, eta_ratio=3.0, fraction=0.5) == (math.inf, math.inf)


def test_contributing_tokens_get_less_noise_and_the_switch_turns_it_off(train):
    model = build_tiny(vocab_size=VOCAB, num_layers=1, seed=0)
    plain = Customer(model, split_layer=0, dx=DXConfig(eta=math.inf))
    index = torch.arange(64)
    reference = plain.crossing(train, index, namespace="train", labels=False).hidden

    def moved(cti: CTIConfig):
        customer = Customer(model, split_layer=0, dx=DXConfig(eta=ETA), noise=NoiseStream(seed=0))
        customer.fit_contributing(train, cti)
        return customer, (customer.crossing(train, index, namespace="train", labels=False).hidden - reference
                          ).norm(dim=-1)

    off, distance_off = moved(CTIConfig(enabled=False, num_tokens=2))
    on, distance_on = moved(CTIConfig(enabled=True, num_tokens=2, eta_ratio=4.0))
    assert off.token_etas is None
    from compression.data import collate

    input_ids, mask, _ = collate(train, index)
    marker = torch.isin(input_ids, torch.tensor(MARKERS)) & mask.bool()
    other = ~marker & mask.bool()
    hidden_size = model.encoder.config.hidden_size
    torch.testing.assert_close(distance_off[mask.bool()].mean().item(), hidden_size / ETA, rtol=0.1, atol=0)
    torch.testing.assert_close(distance_on[marker].mean().item(), hidden_size / on.token_etas.eta_contributing,
                               rtol=0.1, atol=0)
    torch.testing.assert_close(distance_on[other].mean().item(), hidden_size / on.token_etas.eta_other,
                               rtol=0.1, atol=0)
    assert distance_on[marker].mean() < distance_off[marker].mean() / 2
