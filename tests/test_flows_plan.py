"""flows.plan: which lines a config makes, their stage names and shares, and the plan under each scope."""
from pathlib import Path

import pytest

from flows.config import ConfigError, load_config
from flows.plan import model_lines as lines
from flows.plan import plan_study, stage_plans
from privacy.accounting import DPEvent, compose_epsilon


def plan_sigmas(cfg, num_train):
    return {name: budget.noise_multiplier for name, budget in plan_study(cfg, num_train).items()}


def _cfg(tmp_path, text: str, overrides=()):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: {task: sst2}\n" + text)
    return load_config(path, list(overrides))


def test_default_is_one_chain_with_distill_after_pruning(tmp_path):
    cfg = _cfg(tmp_path, "")
    assert {k: [s.name for s in v] for k, v in lines(cfg).items()} == {
        "unstructured": ["prune_1", "prune_2", "distill"]}


# The planner's logic is tested with the fast RDP accountant where it calibrates many stages (PRV and PLD: their own
# tests in test_privacy_accounting.py).
def test_paper_lines(tmp_path):
    cfg = _cfg(tmp_path, """
prune: {schedule: {sparsities: [0.5, 0.7, 0.9]}}
structured: {enabled: true, schedule: {rounds: 2}}
distill: {after: teacher, inits: [every_other, pretrained, random]}
privacy: {scope: line, accountant: rdp}
""")
    got = {k: [(s.name, s.kind) for s in v] for k, v in lines(cfg).items()}
    assert got == {"unstructured": [("prune_1", "prune"), ("prune_2", "prune"), ("prune_3", "prune")],
                   "structured": [("structured_1", "structured"), ("structured_2", "structured")],
                   "distill_every_other": [("distill_every_other", "distill")],
                   "distill_pretrained": [("distill_pretrained", "distill")],
                   "distill_random": [("distill_random", "distill")]}
    cfg = _cfg(tmp_path, "structured: {enabled: true, schedule: {rounds: 1}}\n"
                         "privacy: {scope: line, accountant: rdp}\ndistill: {after: teacher}\n")
    sigmas = plan_sigmas(cfg, 4000)
    delta = 4000 ** -1.1
    for line in lines(cfg).values():  # each line composes to the budget with the one teacher sigma
        events = [cfg.teacher.train, *[getattr(cfg, s.section).train for s in line]]
        names = ["teacher", *[s.name for s in line]]
        composed = compose_epsilon([_event(t, sigmas[n]) for t, n in zip(events, names)], delta=delta,
                                   accountant="rdp")
        assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
        assert composed <= cfg.privacy.epsilon * (1 + 1e-9)


def test_per_target_lines_prune_the_teacher_once_each_with_the_whole_share(tmp_path):
    cfg = _cfg(tmp_path, "prune: {layout: per_target, schedule: {sparsities: [0.5, 0.7]}}\n"
                         "distill: {enabled: false}\nprivacy: {scope: line, accountant: rdp}\n")
    got = {k: [(s.name, s.round_index, s.share) for s in v] for k, v in lines(cfg).items()}
    share = cfg.privacy.share("prune")  # each line holds the whole pruning share, not a round's part of it
    assert got == {"unstructured_50": [("prune_1", 1, share)], "unstructured_70": [("prune_2", 2, share)]}
    sigmas = plan_sigmas(cfg, 4000)
    assert sigmas["prune_1"] == pytest.approx(sigmas["prune_2"])  # same training, same remaining budget
    chained = plan_sigmas(_cfg(tmp_path, "prune: {schedule: {sparsities: [0.5, 0.7]}}\n"
                                         "distill: {enabled: false}\nprivacy: {scope: line, accountant: rdp}\n"), 4000)
    assert sigmas["prune_1"] < chained["prune_1"]  # a whole share is less noise than half of one
    for line in lines(cfg).values():
        composed = compose_epsilon([_event(cfg.teacher.train, sigmas["teacher"]),
                                    _event(cfg.prune.train, sigmas[line[0].name])], delta=4000 ** -1.1,
                                   accountant="rdp")
        assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
    with pytest.raises(ConfigError, match="distill.after: prune needs prune.layout: chain"):
        _cfg(tmp_path, "prune: {layout: per_target}\n")


def test_wanda_scorer_adds_a_fixed_sigma_release_before_each_pruning_round(tmp_path):
    """scorer wanda: each pruning round is preceded by `{round}_stats`, one Gaussian sum over all examples
    (q = 1, one step) at sigma stats_noise; the round's fine-tuning is calibrated around it and the line still
    composes to the budget."""
    cfg = _cfg(tmp_path, "prune: {layout: per_target, schedule: {sparsities: [0.5, 0.7], scorer: wanda, "
                         "scope: row, stats_noise: 8.0}}\ndistill: {enabled: false}\nprivacy: {scope: line}\n")
    got = {k: [(p.stage, p.sample_rate, p.num_steps, p.noise_multiplier) for p in v]
           for k, v in stage_plans(cfg, 4000)[1].items()}
    q, steps = cfg.prune.train.sample_rate(4000), cfg.prune.train.num_steps(4000)
    assert got == {"unstructured_50": [("prune_1_stats", 1.0, 1, 8.0), ("prune_1", q, steps, None)],
                   "unstructured_70": [("prune_2_stats", 1.0, 1, 8.0), ("prune_2", q, steps, None)]}
    assert list(plan_study(cfg, 4000)) == ["teacher", "prune_1_stats", "prune_1", "prune_2_stats", "prune_2"]
    sigmas = plan_sigmas(cfg, 4000)
    assert sigmas["prune_1_stats"] == 8.0
    from flows.budget_cli import plan_values

    rows = {r["stage"]: r for r in plan_values(cfg, 4000)["stages"]}  # `dpcompress budget plan` shows the release
    assert (rows["prune_2_stats"]["line"], rows["prune_2_stats"]["fixed"]) == ("unstructured_70", True)
    assert rows["teacher"]["epsilon"] < rows["prune_2_stats"]["epsilon"] < rows["prune_2"]["epsilon"]
    plain = plan_sigmas(_cfg(tmp_path, "prune: {layout: per_target, schedule: {sparsities: [0.5, 0.7]}}\n"
                                       "distill: {enabled: false}\nprivacy: {scope: line}\n"), 4000)
    assert sigmas["prune_1"] > plain["prune_1"]  # the release's cost comes out of the fine-tuning's noise
    release = DPEvent(noise_multiplier=8.0, sample_rate=1.0, num_steps=1)
    composed = compose_epsilon([_event(cfg.teacher.train, sigmas["teacher"]), release,
                                _event(cfg.prune.train, sigmas["prune_1"])], delta=4000 ** -1.1)
    assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
    assert composed <= cfg.privacy.epsilon * (1 + 1e-9)
    fixed = plan_sigmas(_cfg(tmp_path, "prune: {layout: per_target, schedule: {sparsities: [0.5], "
                                       "scorer: wanda, scope: layer}}\ndistill: {enabled: false}\n"
                                       "privacy: {scope: line, fixed_noise: {prune_1_stats: 20.0}}\n"), 4000)
    assert fixed["prune_1_stats"] == 20.0  # privacy.fixed_noise overrides stats_noise
    with pytest.raises(ConfigError, match="prune.schedule"):
        _cfg(tmp_path, "prune: {schedule: {scorer: wanda}}\n")  # global scope: refused, key named
    public = _cfg(tmp_path, "prune: {layout: per_target, schedule: {sparsities: [0.5], scorer: wanda, "
                            "scope: row, reconstruct: true}, calibration: {task: cola}}\n"
                            "distill: {enabled: false}\nprivacy: {scope: line}\n")
    assert [p.stage for p in stage_plans(public, 4000)[1]["unstructured_50"]] == ["prune_1"]  # public text: no release
    assert [c.task for c in public.prune.calibration] == ["cola"]  # one data section reads as a list of one
    assert plan_sigmas(public, 4000)["prune_1"] == pytest.approx(plain["prune_1"])


def _event(train, sigma):
    from privacy.accounting import DPEvent

    return DPEvent(noise_multiplier=sigma, sample_rate=train.sample_rate(4000), num_steps=train.num_steps(4000))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="distill.inits"):
        _cfg(tmp_path, "distill: {inits: [every_other, nope]}\n")
    with pytest.raises(ConfigError, match="structured.schedule"):
        _cfg(tmp_path, "structured: {enabled: true, schedule: {scorer: taylor}}\n")
    with pytest.raises(ConfigError, match="prune.layout"):
        _cfg(tmp_path, "prune: {layout: each}\n")
    with pytest.raises(ConfigError, match="prune.method"):
        _cfg(tmp_path, "prune: {method: {name: weights}}\n")
    with pytest.raises(ConfigError, match=r"teacher.method.full: .*layers must be"):
        _cfg(tmp_path, "teacher: {method: {name: full, layers: -1}}\n")
    with pytest.raises(ConfigError, match="privacy.scope"):
        _cfg(tmp_path, "privacy: {scope: everything}\n")
    with pytest.raises(ConfigError, match="prune.public_distill.*prune.calibration"):
        _cfg(tmp_path, "prune: {public_distill: {epochs: 1}}\n")  # public distillation needs public texts
    with pytest.raises(ConfigError, match="prune.public_distill.*learning_rate"):
        _cfg(tmp_path, "prune: {public_distill: {learning_rate: 0}, calibration: {task: cola}}\n")
    with pytest.raises(ConfigError, match="structured.schedule.*drop_layers"):
        _cfg(tmp_path, "structured: {enabled: true, schedule: {drop_layers: bottom}}\n")
    with pytest.raises(ConfigError, match=r"prune.calibration\[1\].task='sst2' is the private task"):
        _cfg(tmp_path, "prune: {calibration: [{task: cola}, {task: sst2}]}\n")  # "public" text must not be private
    with pytest.raises(ConfigError, match="reproducible_noise.*secure_mode"):
        _cfg(tmp_path, "privacy: {reproducible_noise: true, secure_mode: true}\n")


@pytest.mark.parametrize("old,new", [
    ("teacher: {epochs: 3}", "teacher.epochs: moved to teacher.train.epochs"),
    ("prune: {train: {trainable_layers: 2}}", "prune.train.trainable_layers: replaced by prune.method"),
    ("distill: {train: {trainable_params: bias_norm}}", "distill.train.trainable_params: replaced by distill.method"),
    ("privacy: {teacher_share: 0.4}", "privacy.teacher_share: renamed to privacy.shares.teacher"),
    ("prune: {distill_alpha: 0.5}", "prune.distill_alpha: renamed to prune.kd.weight"),
    ("structured: {temperature: 3}", "structured.temperature: renamed to structured.kd.temperature"),
    ("distill: {method: {alpha: 0.5}}", "distill.method.alpha: renamed to distill.kd.weight"),
    ("distill: {method: {init: random}}", "distill.method.init: renamed to distill.student.init"),
    ("distill: {method: {student: x}}", "distill.method.student: renamed to distill.student.pretrained"),
    ("prune: {lines: per_target}", "prune.lines: renamed to prune.layout"),
    ("prune: {schedule: {scorer: activation}}", "prune.schedule.scorer: 'activation' is now 'wanda'"),
    ("teacher: {train: {engine: bk}}", "teacher.train.engine: 'bk' is now 'bookkeeping'"),
])
def test_keys_of_an_older_version_name_the_new_key(tmp_path, old, new):
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, old + "\n")
    assert new in str(info.value)


def test_a_new_stage_kind_is_one_registry_entry(tmp_path, monkeypatch):
    """A kind registered in flows.kinds.KINDS (a planner and a runner) is planned, budgeted and shown by
    `dpcompress budget plan` with nothing else changed; its task is the runner's business."""
    from flows import kinds
    from flows.budget_cli import plan_values
    from flows.plan import Stage

    def lines(cfg, so_far):
        return so_far | {"sidecar": [Stage("sidecar_1", "sidecar", "distill", cfg.privacy.share("distill"))]}

    monkeypatch.setitem(kinds.KINDS, "sidecar", kinds.StageKind(lines=lines, run=lambda stage, state, run: state))
    cfg = _cfg(tmp_path, "prune: {enabled: false}\ndistill: {enabled: false}\nprivacy: {accountant: rdp}\n")
    assert list(lines(cfg, {})) == ["sidecar"] and "sidecar" in kinds.KINDS
    rows = {r["stage"]: r for r in plan_values(cfg, 4000)["stages"]}
    assert rows["sidecar_1"]["line"] == "sidecar" and rows["sidecar_1"]["epsilon"] == pytest.approx(8.0, rel=0.02)


def test_memarc_study_every_line_at_epsilon_and_the_dataset_budget_covers_all(tmp_path):
    """flows/configs/memarc.yaml: the teacher and each finetune line (from the pretrained model, its ledger without
    the teacher) meet epsilon on their own; the stated dataset budget covers releasing all of them."""
    from pathlib import Path

    from flows.plan import cumulative_epsilons, pretrained_stages

    cfg = load_config(Path(__file__).resolve().parents[1] / "flows/configs/memarc.yaml",
                      ["privacy.accountant=rdp"])
    got = {k: [(s.name, s.kind, s.independent) for s in v] for k, v in lines(cfg).items()}
    assert got == {f"finetune_{m}": [(f"finetune_{m}", "finetune", True)]
                   for m in ("bitfit", "lora", "side", "reversible")}
    n = 8000
    budgets = plan_study(cfg, n)
    spent = cumulative_epsilons(cfg, budgets)
    assert set(spent) == {"teacher", *(f"finetune_{m}" for m in ("bitfit", "lora", "side", "reversible"))}
    for stage, epsilon in spent.items():
        assert epsilon == pytest.approx(8.0, rel=0.02) and epsilon <= 8.0 * (1 + 1e-9), stage
    union = compose_epsilon([b.event for b in budgets.values()], delta=budgets["teacher"].delta, accountant="rdp")
    assert 8.0 < union <= cfg.privacy.dataset_budget * 1.05  # rdp is a little above prv, which the config states
    assert set(pretrained_stages(cfg)) == {"nonprivate_teacher", *spent}
    assert pretrained_stages(cfg)["finetune_side"][0].method.name == "side"
    assert pretrained_stages(cfg)["nonprivate_teacher"][1] is False


def test_finetune_section_refuses_bad_lines(tmp_path):
    with pytest.raises(ConfigError, match="finetune.lines: .*line name 'LoRA'"):
        _cfg(tmp_path, "finetune: {enabled: true, lines: {LoRA: {method: {name: lora}}}}\n")
    with pytest.raises(ConfigError, match="finetune.*at least one line"):
        _cfg(tmp_path, "finetune: {enabled: true}\n")
    with pytest.raises(ConfigError, match=r"finetune.lines.lora.method.lora.rnak: unknown key"):
        _cfg(tmp_path, "finetune: {enabled: true, lines: {lora: {method: {name: lora, rnak: 4}}}}\n")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "flows" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_plans_within_its_epsilon(path):
    """The configs the README names load, and every stage's cumulative epsilon meets the config's (n as the config caps
    it, or SST-2's 67,349 training examples)."""
    from flows.plan import cumulative_epsilons

    config = load_config(path)
    n = config.data.max_train_examples or 67_349
    spent = cumulative_epsilons(config, plan_study(config, n))
    assert spent and max(spent.values()) <= config.privacy.epsilon * (1 + 1e-6)
