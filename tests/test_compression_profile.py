"""compression.profile: a method's training step on synthetic tokens, measured in this process and in a fresh one."""
import pytest
from transformers import AutoTokenizer

from compression.models import build_tiny, resolve_model_path, save_classifier
from compression.profile import measure_in_fresh_process, run_job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model = build_tiny(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    save_classifier(model, AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), directory)
    return str(directory)


def _job(path, method, **kw):
    return {"model": {"name_or_path": path, "num_labels": 2, "pooling": "mean"}, "method": method, "batch_size": 4,
            "seq_len": 16, "steps": 1} | kw


def test_trainable_parameters_follow_the_method_and_dp_costs_step_memory(tiny):
    full = run_job(_job(tiny, {"name": "full", "layers": "all"}))
    bitfit = run_job(_job(tiny, {"name": "bitfit", "layers": "all"}))
    side = run_job(_job(tiny, {"name": "side", "reduction": 2}))
    plain = run_job(_job(tiny, {"name": "full", "layers": "all"}, dp=False))
    # every encoder weight but the (frozen) embeddings, plus the head: 2 layers of a 32-wide BERT
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    assert full["trainable_parameters"] == plain["trainable_parameters"] == 2 * layer + 32 * 2 + 2  # + the head
    assert bitfit["trainable_parameters"] < side["trainable_parameters"] < full["trainable_parameters"]
    for row in (full, bitfit, side, plain):
        assert row["peak_mb"] >= row["rss_before_step_mb"] > 0 and row["step_mb"] >= 0 and row["median_step_s"] > 0


def test_a_fresh_process_measures_the_same_step(tiny):
    job = _job(tiny, {"name": "lora", "rank": 2, "targets": ["query", "value"]})
    fresh, here = measure_in_fresh_process(job), run_job(job)
    assert fresh["trainable_parameters"] == here["trainable_parameters"]
    assert 100 < fresh["peak_mb"] < 4000  # torch and transformers loaded, a tiny model: not this test process
    with pytest.raises(RuntimeError, match="profiling worker exited"):
        measure_in_fresh_process(_job(tiny + "-missing", {"name": "full"}))
