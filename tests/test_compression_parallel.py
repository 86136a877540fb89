"""Data-parallel DP training (TrainConfig.processes; compression.parallel, privacy.distributed) over 2 gloo processes:
the same weights as one process given the same seeded randomness, noise added once per step (not once per rank), the
union of the ranks' batches is one process's Poisson sample, and a stage's ledger records the plan's q."""
import logging

import pytest
import torch

from compression.models import build_tiny
from compression.train import TrainConfig, dp_train
from privacy.distributed import own_examples
from privacy.engine import PoissonSampler

pytestmark = pytest.mark.slow  # each 2-process run spawns an interpreter (~10-20 s on 2 shared cores)
N = 48
BATCH = 16  # q = 1/3


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 1000, (int(k),), generator=g).tolist() for k in torch.randint(4, 12, (n,), generator=g)]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids],
            "labels": torch.randint(0, 2, (n,), generator=g)}


def _no_signal(logits, labels, index):
    """A loss with zero gradient for every example (module level: a data-parallel loss must be picklable)."""
    return logits.sum(-1) * 0.0


def _train(processes, *, engine="bookkeeping", noise_seed=7, sigma=1.0, epochs=1.0, loss_fn=None, **train):
    model = build_tiny(seed=0, dropout=0.0)  # no dropout: ranks draw dropout from their own seeds
    train = {"learning_rate": 0.5, "encoder_learning_rate": 0.5, **train}
    config = TrainConfig(epochs=epochs, batch_size=BATCH, physical_batch_size=4, engine=engine, processes=processes,
                         checkpoint_every=0, **train)
    result = dp_train(model, _data(), config=config, noise_multiplier=sigma, noise_seed=noise_seed, loss_fn=loss_fn)
    return model, result


def _max_abs_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def two_processes():
    """The seeded 2-process bookkeeping run (3 steps), shared by the equality and the resume tests."""
    return _train(2)


@pytest.mark.parametrize("engine", ["bookkeeping", "ghost", "hooks"])
def test_two_gloo_processes_give_one_process_weights(engine, two_processes):
    one, result_one = _train(1, engine=engine)
    two, result_two = two_processes if engine == "bookkeeping" else _train(2, engine=engine)
    difference = _max_abs_diff(one, two)
    logging.getLogger(__name__).warning("%s: max |w_1proc - w_2proc| = %.3g", engine, difference)
    assert difference < 1e-5
    assert _max_abs_diff(one, build_tiny(seed=0, dropout=0.0)) > 1e-2  # it trained
    assert (result_two.sample_rate, result_two.num_steps) == (result_one.sample_rate, result_one.num_steps)
    assert result_two.sample_rate == BATCH / N  # the union's q: each rank samples its shard at the plan's q


def test_noise_is_added_once_per_step_not_once_per_rank():
    """Zero gradients, one SGD step (lr 1, no momentum), secret noise: every trainable coordinate moves by z / (qN)
    with z ~ N(0, sigma^2 C^2), once; a second rank's noise would double the variance."""
    before = build_tiny(seed=0, dropout=0.0)
    model, result = _train(2, noise_seed=None, sigma=1.0, epochs=BATCH / N, loss_fn=_no_signal, momentum=0.0,
                           learning_rate=1.0, encoder_learning_rate=1.0)
    assert result.num_steps == 1
    moved = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(model.parameters(), before.parameters())
                       if not torch.equal(p, q)])
    assert moved.numel() > 2000
    variance = float(moved.double().pow(2).mean()) * BATCH ** 2  # in units of (sigma C)^2
    assert 0.85 < variance < 1.15, variance  # 2 if both ranks added noise, 0 if none did


def test_the_ranks_batches_are_one_process_poisson_sample():
    """Every rank draws the same mask (the shared seed) and keeps example i if i % world == rank: the shards are
    disjoint and their union is the one-process batch, a Poisson sample of the whole data at q."""
    for index in PoissonSampler(num_examples=N, sample_rate=BATCH / N, num_steps=20, seed=3):
        parts = [own_examples(index, rank=r, world=3) for r in range(3)]
        assert sorted(torch.cat(parts).tolist()) == index.tolist()
        assert all(set(a.tolist()).isdisjoint(b.tolist()) for i, a in enumerate(parts) for b in parts[i + 1:])


class Interrupted(Exception):
    pass


def test_a_two_process_run_interrupted_on_rank_0_resumes_to_the_uninterrupted_weights(tmp_path, two_processes):
    """Rank 0 writes one checkpoint with every rank's state; a rerun after rank 0 fails (its workers are stopped)
    resumes on both ranks and ends where the uninterrupted 2-process run ends."""
    expected, _ = two_processes  # 3 steps

    def stop(step, metrics):
        if step == 2:
            raise Interrupted

    config = TrainConfig(epochs=1.0, batch_size=BATCH, physical_batch_size=4, learning_rate=0.5,
                         encoder_learning_rate=0.5, processes=2, checkpoint_every=1)
    with pytest.raises(Interrupted):
        dp_train(build_tiny(seed=0, dropout=0.0), _data(), config=config, noise_multiplier=1.0, noise_seed=7,
                 on_step=stop, checkpoint_dir=tmp_path)
    model = build_tiny(seed=0, dropout=0.0)
    result = dp_train(model, _data(), config=config, noise_multiplier=1.0, noise_seed=7, checkpoint_dir=tmp_path)
    assert result.resumed_from == 2 and result.num_steps == 3
    assert _max_abs_diff(model, expected) < 1e-6


def test_a_two_process_stage_records_the_plans_q_in_its_ledger(tmp_path):
    """tasks.stage.run_dp_stage with train.processes=2: one ledger entry, at the plan's q (the union's), sigma and
    steps; the model is saved once, by rank 0 (this process)."""
    from compression.data import save_encoded
    from compression.methods.full import FullConfig
    from compression.models import ModelConfig, save_classifier
    from privacy.config import StageBudget
    from privacy.ledger import Ledger
    from tasks import tracking
    from tasks.refs import DataRef, RunContext
    from tasks.teacher import train_teacher

    save_classifier(build_tiny(seed=0), None, tmp_path / "base")
    save_encoded(tmp_path / "data" / "train.pt", _data())
    data = DataRef(path=str(tmp_path / "data"), fingerprint="f", source_fingerprint="s", task="sst2",
                   metric="accuracy", num_labels=2, num_train=N, num_dev=0)
    train = TrainConfig(epochs=1, batch_size=BATCH, physical_batch_size=8, checkpoint_every=1, processes=2)
    budget = StageBudget(event=train.event(N, noise_multiplier=1.0), mechanism="dp_sgd", target_epsilon=100.0,
                         delta=1e-3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = RunContext(tracking_uri=uri, parent_run_id=tracking.study_run(
        uri=uri, experiment="e", study_key="parallel", name="study", config={}))
    ref = train_teacher.fn(stage="teacher", budget=budget, data=data, model=ModelConfig(name_or_path=str(
        tmp_path / "base")), method=FullConfig(layers=1), train=train, output_dir=str(tmp_path / "out"),
        context=context)
    entries = Ledger.load(ref.ledger_path).entries
    assert len(entries) == 1
    assert entries[0].sample_rate == budget.event.sample_rate == BATCH / N
    assert (entries[0].noise_multiplier, entries[0].num_steps) == (1.0, budget.event.num_steps)
    assert not (tmp_path / "out" / "checkpoint").exists()
