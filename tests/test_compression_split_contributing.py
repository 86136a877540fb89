"""compression.split.contributing: class-conditional TF-IDF finds the label's tokens, contributing tokens get less
noise, the average eta over the training tokens is the configured one, and the switch turns it all off."""
import math

import pytest
import torch

from compression.models import build_tiny
from compression.split import CTIConfig, Customer, DXConfig
from compression.split.contributing import eta_levels, fit_token_etas, log_odds_scores, token_scores
from privacy.mechanisms.dx import NoiseStream
from tests.test_compression_split import MARKERS, VOCAB, toy_data

ETA = 20.0


@pytest.fixture(scope="module")
def train():
    return toy_data(200, 0)


@pytest.mark.parametrize("score", [token_scores, log_odds_scores])
def test_both_scores_rank_the_label_markers_first(train, score):
    scores = score(train["input_ids"], train["labels"], vocab_size=VOCAB)
    assert set(scores.argsort(descending=True)[:2].tolist()) == set(MARKERS)
    assert scores[2] == 0 and scores[3] == 0  # [CLS] and [SEP] are in every example
    # a token as frequent as a marker but independent of the label scores low: the score is a class contrast
    common = [[*ids[:-1], 7, 7, ids[-1]] if i % 2 else ids for i, ids in enumerate(train["input_ids"])]
    scores = score(common, train["labels"], vocab_size=VOCAB)
    assert scores[7] < scores[list(MARKERS)].min() / 4
    with pytest.raises(ValueError, match="regression"):
        score(train["input_ids"], train["labels"].float(), vocab_size=VOCAB)


def _skewed_and_telling():
    """Token 5 is frequent in both classes with a skew (1,300 against 1,000 times), token 6 rare but only in class 1
    (20 times), token 4 once in class 1, token 1 in every example."""
    labels = torch.tensor([0, 1] * 2000)
    ids = [[1] * 8 for _ in range(4000)]
    for i in range(0, 2600, 2):
        ids[i + 1] = [5, *ids[i + 1][1:]]
    for i in range(0, 2000, 2):
        ids[i] = [5, *ids[i][1:]]
    for i in range(20):
        ids[2 * i + 1 + 2800] = [6, *ids[2 * i + 1 + 2800][1:]]
    ids[3001] = [4, *ids[3001][1:]]
    return ids, labels


def test_log_odds_does_not_rank_a_token_for_its_frequency():
    """TF-IDF's absolute contrast ranks the frequent skewed token 5 first, the log-odds the telling token 6; token 4,
    seen once, does not outrank token 6 (its log-odds shrinks to the pseudo-counts)."""
    ids, labels = _skewed_and_telling()
    tfidf, odds = (score(ids, labels, vocab_size=8) for score in (token_scores, log_odds_scores))
    assert tfidf[5] > tfidf[6]
    assert odds[6] > odds[5] and odds[6] > odds[4] > 0
    assert odds[1] == 0 and odds[7] == 0  # in every example; never seen


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


def test_the_cti_config_names_a_bad_field():
    for bad, match in (({"num_tokens": 0}, "num_tokens"), ({"eta_ratio": 0.5}, "eta_ratio"),
                       ({"score": "chi2"}, "score must be one of tfidf, log_odds")):
        with pytest.raises(ValueError, match=match):
            CTIConfig(enabled=True, **bad)


def test_the_chosen_score_picks_the_contributing_set():
    """fit_token_etas ranks by `config.score`: with one contributing token, TF-IDF's is token 5, the log-odds' 6."""
    ids, labels = _skewed_and_telling()
    for name, top in (("tfidf", 5), ("log_odds", 6)):
        levels = fit_token_etas(ids, labels, eta=ETA, vocab_size=8, config=CTIConfig(enabled=True, num_tokens=1,
                                                                                     score=name))
        assert levels.contributing.nonzero().flatten().tolist() == [top]


@pytest.mark.parametrize("shares", [(0.6, 0.4), (1 / 3, 1 / 3, 1 / 3), (0.5, 0.3, 0.2)])
def test_log_odds_ranks_a_cue_above_rare_tokens_whatever_the_class_sizes(shares):
    """Class sizes in `shares` (imbalanced, or three classes): token 4 is a cue of the smallest class (30 times there,
    5 in each other class), tokens 10.. are seen once or twice each in the smallest class only; token 1 is filler in
    every example and token 7 is never seen. One-vs-rest with equal pseudo-counts would lift every rare token of a
    small class by log(n_rest / n_class); in proportion to the sides' sizes, rare tokens stay below the cue."""
    counts = [int(3000 * share) for share in shares]
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    small = len(counts) - 1 if shares[-1] <= min(shares) else int(torch.tensor(shares).argmin())
    ids = [[1] * 6 for _ in labels]
    rows = {c: (labels == c).nonzero().flatten().tolist() for c in range(len(counts))}
    for c, rows_c in rows.items():
        for row in rows_c[:30 if c == small else 5]:
            ids[row][0] = 4
    for k, row in enumerate(rows[small][100:160]):
        ids[row][1] = 10 + k // 2  # tokens 10..39, twice each
    for k, row in enumerate(rows[small][200:230]):
        ids[row][1] = 40 + k  # tokens 40..69, once each
    scores = log_odds_scores(ids, labels, vocab_size=80)
    assert scores[4] > scores[10:70].max()
    assert scores[40:70].max() < 0.45  # a token seen once (equal pseudo-counts would give 0.59, 0.88 and 1.57 here)
    assert scores[1] == 0 and scores[7] == 0 and scores[70:].eq(0).all()


def test_log_odds_skips_a_class_without_examples():
    """Labels {1, 2} (class 0 never occurs) score like labels {0, 1}; a single class scores nothing."""
    ids = [[1, 4], [1, 5], [1, 4], [1, 6]] * 50
    labels = torch.tensor([0, 1, 0, 1] * 50)
    assert torch.allclose(log_odds_scores(ids, labels + 1, vocab_size=8), log_odds_scores(ids, labels, vocab_size=8))
    assert log_odds_scores(ids, torch.zeros(200, dtype=torch.long), vocab_size=8).eq(0).all()
