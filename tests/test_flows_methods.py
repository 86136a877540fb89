"""A study config whose teacher uses method `lora`, `side` or `reversible` parses, plans, and its teacher stage trains
a tiny model with the planned DP event (prepare -> dp_train -> merge, as tasks.stage.run_dp_stage does), is saved,
evaluated and exported to a folder `AutoModelForSequenceClassification` loads. Library calls only: no Prefect, no
MLflow."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from compression.data import pad
from compression.evaluate import evaluate
from compression.export import export_hf
from compression.methods import merge, prepare
from compression.models import build_tiny, load_saved, save_classifier
from compression.train import dp_train
from flows.config import ConfigError, load_config
from flows.plan import plan_study

NUM_TRAIN = 64


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = [(torch.randint(5, 50, (int(k),), generator=g) + 45 * int(y)).tolist()
           for k, y in zip(torch.randint(4, 10, (n,), generator=g), labels)]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}


@pytest.mark.parametrize("method", ["{name: lora, rank: 2, targets: [query, value, ffn_out]}",
                                    "{name: side, reduction: 4}", "{name: reversible}"])
def test_teacher_with_method_plans_trains_evaluates_and_exports(method, tmp_path, tokenizer):
    path = tmp_path / "study.yaml"
    path.write_text(f"""data: {{task: sst2}}
privacy: {{epsilon: 8.0, accountant: rdp}}
teacher:
  method: {method}
  train: {{epochs: 2, batch_size: 16, physical_batch_size: 8, learning_rate: 0.5, encoder_learning_rate: 0.5,
           checkpoint_every: 2}}
prune: {{enabled: false}}
distill: {{enabled: false}}
""")
    cfg = load_config(path)
    assert cfg.teacher.method.name == method.split(",")[0].removeprefix("{name: ").removesuffix("}")
    budget = plan_study(cfg, NUM_TRAIN)["teacher"]
    assert budget.noise_multiplier > 0 and budget.event.num_steps == 8
    model = prepare(build_tiny(seed=0, dropout=0.0, vocab_size=2048), cfg.teacher.method)  # latency: ids < 2000
    result = dp_train(model, _data(NUM_TRAIN, seed=1), config=cfg.teacher.train, method=cfg.teacher.method,
                      event=budget.event, checkpoint_dir=tmp_path / "checkpoint")
    assert result.num_steps == 8
    model = merge(model, cfg.teacher.method)
    save_classifier(model, tokenizer, tmp_path / "model")
    loaded, _ = load_saved(tmp_path / "model")
    dev = _data(16, seed=2)
    results = evaluate(loaded, dev, metric="accuracy", directory=tmp_path / "model")
    assert 0 <= results["accuracy"] <= 1 and results["parameters"] > 0
    folder = export_hf(loaded, tokenizer, tmp_path / "hf")
    exported = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    input_ids, mask = pad([torch.tensor(x) for x in dev["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=input_ids, attention_mask=mask).logits,
                                   loaded.eval()(input_ids, mask, torch.zeros_like(input_ids)), rtol=0, atol=1e-5)


def test_config_refuses_methods_pruning_cannot_follow(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("data: {task: sst2}\nprune: {method: {name: lora}}\n")
    with pytest.raises(ConfigError, match="prune.method.*cannot hold pruning masks"):
        load_config(path)
    path.write_text("data: {task: sst2}\nteacher: {method: {name: side}}\n")
    with pytest.raises(ConfigError, match="pruning lines cannot start from"):
        load_config(path)
    path.write_text("data: {task: sst2}\nteacher: {method: {name: side}}\nprune: {enabled: false}\n"
                    "structured: {enabled: false, method: {name: lora, rank: 4}}\ndistill: {after: teacher}\n")
    assert load_config(path).structured.method.rank == 4
