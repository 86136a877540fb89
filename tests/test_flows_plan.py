"""flows.plan: which lines a config makes, their stage names and shares, and the plan under each scope."""
import pytest

from flows.config import ConfigError, load_config
from flows.plan import lines, plan_sigmas
from privacy.accounting import DPEvent, compose_epsilon


def _cfg(tmp_path, text: str, overrides=()):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: {task: sst2}\n" + text)
    return load_config(path, list(overrides))


def test_default_is_one_chain_with_distill_after_pruning(tmp_path):
    cfg = _cfg(tmp_path, "")
    assert {k: [s.name for s in v] for k, v in lines(cfg).items()} == {
        "unstructured": ["prune_1", "prune_2", "distill"]}


def test_paper_lines(tmp_path):
    cfg = _cfg(tmp_path, """
prune: {schedule: {sparsities: [0.5, 0.7, 0.9]}}
structured: {enabled: true, schedule: {rounds: 2}}
distill: {after: teacher, inits: [every_other, pretrained, random]}
privacy: {scope: line}
""")
    got = {k: [(s.name, s.kind) for s in v] for k, v in lines(cfg).items()}
    assert got == {"unstructured": [("prune_1", "prune"), ("prune_2", "prune"), ("prune_3", "prune")],
                   "structured": [("structured_1", "structured"), ("structured_2", "structured")],
                   "distill_every_other": [("distill_every_other", "distill")],
                   "distill_pretrained": [("distill_pretrained", "distill")],
                   "distill_random": [("distill_random", "distill")]}
    cfg = _cfg(tmp_path, "structured: {enabled: true, schedule: {rounds: 1}}\nprivacy: {scope: line}\n"
                         "distill: {after: teacher}\n")  # three short lines: calibrating takes seconds each
    sigmas = plan_sigmas(cfg, 4000)
    delta = 4000 ** -1.1
    for line in lines(cfg).values():  # each line composes to the budget with the one teacher sigma
        events = [cfg.teacher, *[s.train for s in line]]
        names = ["teacher", *[s.name for s in line]]
        composed = compose_epsilon([_event(t, sigmas[n]) for t, n in zip(events, names)], delta=delta)
        assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
        assert composed <= cfg.privacy.epsilon * (1 + 1e-9)


def test_per_target_lines_prune_the_teacher_once_each_with_the_whole_share(tmp_path):
    cfg = _cfg(tmp_path, "prune: {lines: per_target, schedule: {sparsities: [0.5, 0.7]}}\n"
                         "distill: {enabled: false}\nprivacy: {scope: line}\n")
    got = {k: [(s.name, s.round_index, s.share) for s in v] for k, v in lines(cfg).items()}
    share = cfg.privacy.prune_share  # each line holds the whole pruning share, not a round's part of it
    assert got == {"unstructured_50": [("prune_1", 1, share)], "unstructured_70": [("prune_2", 2, share)]}
    sigmas = plan_sigmas(cfg, 4000)
    assert sigmas["prune_1"] == pytest.approx(sigmas["prune_2"])  # same training, same remaining budget
    chained = plan_sigmas(_cfg(tmp_path, "prune: {schedule: {sparsities: [0.5, 0.7]}}\n"
                                         "distill: {enabled: false}\nprivacy: {scope: line}\n"), 4000)
    assert sigmas["prune_1"] < chained["prune_1"]  # a whole share is less noise than half of one
    for line in lines(cfg).values():
        composed = compose_epsilon([_event(cfg.teacher, sigmas["teacher"]), _event(line[0].train, sigmas[line[0].name])],
                                   delta=4000 ** -1.1)
        assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
    with pytest.raises(ConfigError, match="distill.after: prune needs prune.lines: chain"):
        _cfg(tmp_path, "prune: {lines: per_target}\n")


def test_activation_scorer_adds_a_fixed_sigma_release_before_each_pruning_round(tmp_path):
    """scorer activation: each pruning round is preceded by `{round}_stats`, one Gaussian sum over all examples
    (q = 1, one step) at sigma stats_noise; the round's fine-tuning is calibrated around it and the line still
    composes to the budget."""
    from flows.plan import line_plans, private_stages

    cfg = _cfg(tmp_path, "prune: {lines: per_target, schedule: {sparsities: [0.5, 0.7], scorer: activation, "
                         "scope: row, stats_noise: 8.0}}\ndistill: {enabled: false}\nprivacy: {scope: line}\n")
    got = {k: [(p.stage, p.sample_rate, p.num_steps, p.noise_multiplier) for p in v]
           for k, v in line_plans(cfg, 4000).items()}
    q, steps = cfg.prune.train.sample_rate(4000), cfg.prune.train.num_steps(4000)
    assert got == {"unstructured_50": [("prune_1_stats", 1.0, 1, 8.0), ("prune_1", q, steps, None)],
                   "unstructured_70": [("prune_2_stats", 1.0, 1, 8.0), ("prune_2", q, steps, None)]}
    assert [p.stage for p in private_stages(cfg, 4000)] == ["teacher", "prune_1_stats", "prune_1", "prune_2_stats",
                                                            "prune_2"]
    sigmas = plan_sigmas(cfg, 4000)
    assert sigmas["prune_1_stats"] == 8.0
    from flows.budget_cli import plan_values

    rows = {r["stage"]: r for r in plan_values(cfg, 4000)["stages"]}  # `dpcompress budget plan` shows the release
    assert (rows["prune_2_stats"]["line"], rows["prune_2_stats"]["fixed"]) == ("unstructured_70", True)
    assert rows["teacher"]["epsilon"] < rows["prune_2_stats"]["epsilon"] < rows["prune_2"]["epsilon"]
    plain = plan_sigmas(_cfg(tmp_path, "prune: {lines: per_target, schedule: {sparsities: [0.5, 0.7]}}\n"
                                       "distill: {enabled: false}\nprivacy: {scope: line}\n"), 4000)
    assert sigmas["prune_1"] > plain["prune_1"]  # the release's cost comes out of the fine-tuning's noise
    release = DPEvent(noise_multiplier=8.0, sample_rate=1.0, num_steps=1)
    composed = compose_epsilon([_event(cfg.teacher, sigmas["teacher"]), release,
                                _event(cfg.prune.train, sigmas["prune_1"])], delta=4000 ** -1.1)
    assert composed == pytest.approx(cfg.privacy.epsilon, rel=0.01)
    assert composed <= cfg.privacy.epsilon * (1 + 1e-9)
    fixed = plan_sigmas(_cfg(tmp_path, "prune: {lines: per_target, schedule: {sparsities: [0.5], "
                                       "scorer: activation, scope: layer}}\ndistill: {enabled: false}\n"
                                       "privacy: {scope: line, fixed_noise: {prune_1_stats: 20.0}}\n"), 4000)
    assert fixed["prune_1_stats"] == 20.0  # privacy.fixed_noise overrides stats_noise
    with pytest.raises(ConfigError, match="prune.schedule"):
        _cfg(tmp_path, "prune: {schedule: {scorer: activation}}\n")  # global scope: refused, key named
    public = _cfg(tmp_path, "prune: {lines: per_target, schedule: {sparsities: [0.5], scorer: activation, "
                            "scope: row, reconstruct: true}, calibration: {task: cola}}\n"
                            "distill: {enabled: false}\nprivacy: {scope: line}\n")
    assert [p.stage for p in private_stages(public, 4000)] == ["teacher", "prune_1"]  # public text: no release
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
    with pytest.raises(ConfigError, match="prune.lines"):
        _cfg(tmp_path, "prune: {lines: each}\n")
    with pytest.raises(ConfigError, match="prune.train.trainable_params"):
        _cfg(tmp_path, "prune: {train: {trainable_params: weights}}\n")
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
