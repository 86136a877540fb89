"""The `dpcompress budget` commands: epsilon of a DP-SGD run, the smallest sigma for a target epsilon, a study's
privacy plan (per-stage sigma and cumulative epsilon) computed before anything trains, and what each dataset has
spent across studies (the dataset ledger)."""
from __future__ import annotations

import argparse
import json
import math
import sys

from flows.tables import format_table

SAMPLING, UNIT = "poisson", "example"  # what the accountants assume (privacy/accounting.py)


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit code 2 (argparse's default prints the usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind=float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def sample_rate(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def delta(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def steps(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _guarantee(values: dict, delta_note: str = "") -> str:
    return (f"at delta = {values['delta']:g}{delta_note} ({values['accountant']} accountant, "
            f"{values['sampling'].capitalize()} sampling, unit of privacy: one {values['unit']})")


def _emit(args, values: dict, line: str) -> int:
    print(json.dumps(values, sort_keys=True) if args.json else line)
    return 0


def cmd_epsilon(args) -> int:
    from privacy.accounting import DPEvent, compose_epsilon

    event = DPEvent(noise_multiplier=args.noise_multiplier, sample_rate=args.sample_rate, num_steps=args.steps)
    epsilon = compose_epsilon([event], delta=args.delta, accountant=args.accountant)
    values = {"epsilon": epsilon, "sigma": args.noise_multiplier, "sample_rate": args.sample_rate,
              "steps": args.steps, "delta": args.delta, "accountant": args.accountant,
              "sampling": SAMPLING, "unit": UNIT}
    return _emit(args, values, f"epsilon = {epsilon:.4f} {_guarantee(values)} for {args.steps} steps "
                               f"at sample rate {args.sample_rate:g} with noise multiplier {args.noise_multiplier:g}")


def cmd_sigma(args) -> int:
    from privacy.accounting import DPEvent, calibrate_noise, compose_epsilon

    try:
        sigma = calibrate_noise(sample_rate=args.sample_rate, num_steps=args.steps, target_epsilon=args.epsilon,
                                delta=args.delta, accountant=args.accountant)
    except ValueError as err:  # BudgetError: no sigma up to SIGMA_MAX fits
        return _fail(err)
    event = DPEvent(noise_multiplier=sigma, sample_rate=args.sample_rate, num_steps=args.steps)
    epsilon = compose_epsilon([event], delta=args.delta, accountant=args.accountant)
    values = {"sigma": sigma, "epsilon": epsilon, "target_epsilon": args.epsilon, "sample_rate": args.sample_rate,
              "steps": args.steps, "delta": args.delta, "accountant": args.accountant,
              "sampling": SAMPLING, "unit": UNIT}
    return _emit(args, values, f"sigma = {sigma:.4f} for {args.steps} steps at sample rate {args.sample_rate:g} "
                               f"gives epsilon = {epsilon:.4f} <= {args.epsilon:g} {_guarantee(values)}")


def _fail(err: Exception | str, prefix: str = "dpcompress: ") -> int:
    print(f"{prefix}{err}", file=sys.stderr)
    return 2


def plan_values(cfg, num_train: int) -> dict:
    """The privacy plan of study `cfg` with `num_train` private examples, as plain values (no I/O): the budgets the
    study's stages will use (flows.plan.plan_study), each stage's epsilon cumulative in run order (scope "study") or
    along its own line, teacher first (scope "line"); `epsilon` is the study's total or the largest line's."""
    from flows.plan import cumulative_epsilons, model_lines, plan_study, stage_plans
    from privacy.accounting import compose_epsilon

    budget = cfg.privacy
    budgets = plan_study(cfg, num_train)
    spent = cumulative_epsilons(cfg, budgets)
    teacher, lines = stage_plans(cfg, num_train)
    fixed = {p.stage for p in [teacher, *(p for line in lines.values() for p in line)] if p.noise_multiplier}
    line_of = {s.name: name for name, stages in model_lines(cfg).items() for s in stages}
    rows = [{"stage": name, "line": line_of.get(name, "teacher"), "mechanism": b.mechanism,
             "sample_rate": b.event.sample_rate, "steps": b.event.num_steps, "sigma": b.noise_multiplier,
             "fixed": name in fixed, "epsilon": spent[name]} for name, b in budgets.items()]
    first = next(iter(budgets.values()))
    total = compose_epsilon([b.event for b in budgets.values()], delta=first.delta, accountant=budget.accountant)
    return {"study": cfg.name, "task": cfg.data.task, "num_train": num_train, "stages": rows, "scope": budget.scope,
            "epsilon": total if budget.scope == "study" else max(r["epsilon"] for r in rows),
            "epsilon_all_models": total, "target_epsilon": budget.epsilon, "delta": first.delta,
            "delta_is_default": budget.delta is None, "accountant": budget.accountant,
            "sampling": SAMPLING, "unit": UNIT, "uncomposed": _split_stages(cfg)}


def _split_stages(cfg) -> list[dict]:
    """The split branch's stages (flows/config_split.py): private data under local d_chi noise, no epsilon."""
    from flows.config_split import split_configs

    configs = split_configs(cfg.split) if cfg.split.enabled else {}
    return [{"stage": name, "mechanism": "nonprivate" if math.isinf(c.dx.eta) else "dx",
             "eta": None if math.isinf(c.dx.eta) else c.dx.eta} for name, c in configs.items()]


def format_plan(values: dict) -> str:
    table = format_table([{k: ("yes" if v is True else "" if v is False else v) for k, v in row.items()}
                          for row in values["stages"]])
    note = " = n^-1.1" if values["delta_is_default"] else ""
    return "\n".join([
        f"privacy plan for study {values['study']!r}: {values['task']}, n = {values['num_train']:,} private "
        f"training examples; epsilon is cumulative "
        + ("in run order" if values["scope"] == "study" else
           "along each line, teacher first (a finetune line starts from the pretrained model, without it)"),
        table,
        (f"total: epsilon = {values['epsilon']:.4f} (target {values['target_epsilon']:g}) "
         if values["scope"] == "study" else
         f"each line: epsilon <= {values['epsilon']:.4f} (target {values['target_epsilon']:g}); releasing every "
         f"line's models together: epsilon = {values['epsilon_all_models']:.4f} ") + _guarantee(values, note),
        *_uncomposed_note(values.get("uncomposed", [])),
    ])


def _uncomposed_note(stages: list[dict]) -> list[str]:
    if not stages:
        return []
    etas = sorted({s["eta"] for s in stages if s["eta"] is not None})
    return [f"plus {len(stages)} split stage(s) on the same data, not central DP and never composed into epsilon: "
            f"local d_chi noise per token representation at eta {', '.join(f'{e:g}' for e in etas) or '-'}, "
            f"{sum(s['eta'] is None for s in stages)} without noise (no guarantee); training labels cross to the "
            "vendor as is (recorded in the dataset ledger with their eta)"]


def cmd_plan(args) -> int:
    """The config, its data and the budget pass pre-flight (one line per problem, exit 2), then the plan, computed
    under pre-flight's time limit."""
    from flows.preflight import preflight

    checked = preflight(args.config, args.set, glue_dir=args.glue_dir, for_run=False, plan=plan_values)
    if checked.problems:
        return _fail("\n".join(f"dpcompress: {line}" for line in checked.problems), prefix="")
    print(json.dumps(checked.plan, sort_keys=True) if args.json else format_plan(checked.plan))
    return 0


def spent_values(rows, *, ledger: str, accountant: str | None = None) -> dict:
    """The dataset ledger's spent `rows` as plain values: each release's epsilon alone (at its own delta and
    accountant; None for a non-private one) and, per dataset, its private releases composed at the largest delta
    recorded, with `accountant` (default: that of the dataset's latest private release). A use under a local
    guarantee (a `dx` row: split fine-tuning) has no epsilon; its eta and guarantee are listed, never composed."""
    from privacy.accounting import compose_epsilon
    from privacy.ledger_store import NONPRIVATE

    releases, by_dataset = [], {}
    for row in rows:
        event = row.event
        releases.append({
            "dataset": row.dataset, "study": row.study, "stage": row.stage, "mechanism": row.mechanism,
            "epsilon": None if event is None else compose_epsilon([event], delta=row.delta, accountant=row.accountant),
            "delta": row.delta, "accountant": row.accountant, "noise": row.noise, "date": row.spent_at,
            "eta": row.eta, "guarantee": row.guarantee})
        by_dataset.setdefault(row.dataset, []).append(row)
    datasets = {}
    for name, group in by_dataset.items():
        private = [r for r in group if r.event is not None]
        total = {"epsilon": None, "delta": None, "accountant": None}
        if private:
            chosen = accountant or private[-1].accountant
            largest = max(r.delta for r in private)
            total = {"epsilon": compose_epsilon([r.event for r in private], delta=largest, accountant=chosen),
                     "delta": largest, "accountant": chosen}
        local = sum(r.event is None and r.mechanism != NONPRIVATE for r in group)
        datasets[name] = total | {"releases": len(private), "local_releases": local,
                                  "nonprivate_releases": len(group) - len(private) - local,
                                  "sampling": SAMPLING, "unit": UNIT}
    return {"ledger": ledger, "releases": releases, "datasets": datasets}


def format_spent(values: dict) -> str:
    if not values["releases"]:
        which = f" for dataset {values['dataset']}" if values.get("dataset") else ""
        return f"no releases recorded{which} in {values['ledger']}"
    rows = [r | {"dataset": r["dataset"][:12], "epsilon": _epsilon_cell(r),
                 "date": (r["date"] or "")[:16].replace("T", " ")} for r in values["releases"]]
    lines = [f"releases in {values['ledger']} (epsilon of each release alone, at its own delta):",
             format_table([{k: r[k] for k in ("dataset", "study", "stage", "epsilon", "delta", "mechanism",
                                               "noise", "date")} for r in rows])]
    for name, total in values["datasets"].items():
        nonprivate, local = total["nonprivate_releases"], total.get("local_releases", 0)
        note = f"; plus {nonprivate} non-private release(s), which carry no guarantee" if nonprivate else ""
        note += (f"; plus {local} use(s) under a local d_chi guarantee per token representation (eta listed; no "
                 "central DP, never composed)" if local else "")
        if total["epsilon"] is None:
            lines.append(f"dataset {name}: no private release{note}")
        else:
            lines.append(f"dataset {name}: epsilon = {total['epsilon']:.4f} {_guarantee(total)} over "
                         f"{total['releases']} private release(s), composed{note}")
    return "\n".join(lines)


def _epsilon_cell(release: dict) -> str | float:
    """A release's epsilon, or what stands for it: "inf" (no guarantee), "local eta=E" (a d_chi use)."""
    if release["epsilon"] is not None:
        return release["epsilon"]
    return f"local eta={release['eta']:g}" if release.get("eta") is not None else "inf"


def cmd_spent(args) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from privacy.dataset_ledger import DatasetLedger, default_ledger_url

    try:
        ledger = DatasetLedger(args.ledger or default_ledger_url(), create=False)
    except (ValueError, OSError) as err:  # bad URL, missing driver, no ledger file
        return _fail(err)
    shown = ledger.url.render_as_string(hide_password=True)
    try:
        with ledger:
            rows = ledger.history(args.dataset)
    except SQLAlchemyError as err:  # not a database, no ledger table, unreachable server
        return _fail(f"cannot read the dataset ledger at {shown}: {str(err).splitlines()[0]}")
    values = spent_values(rows, ledger=shown, accountant=args.accountant) | {"dataset": args.dataset}
    print(json.dumps(values, sort_keys=True) if args.json else format_spent(values))
    return 0


def add_budget_parser(subparsers) -> None:
    """Register `budget` and its subcommands `epsilon`, `sigma`, `plan` and `spent` on the `dpcompress` parser."""
    budget = subparsers.add_parser("budget", help="privacy budget: epsilon, sigma, a study's plan, a dataset's spend")
    sub = budget.add_subparsers(dest="budget_command", required=True, parser_class=_OneLineParser)
    eps = sub.add_parser("epsilon", help="epsilon of a Poisson-subsampled DP-SGD run")
    eps.add_argument("--noise-multiplier", type=positive, required=True, help="sigma (> 0)")
    sig = sub.add_parser("sigma", help="smallest sigma that meets a target epsilon")
    sig.add_argument("--epsilon", type=positive, required=True, help="target epsilon (> 0)")
    for parser, func in ((eps, cmd_epsilon), (sig, cmd_sigma)):
        parser.add_argument("--sample-rate", type=sample_rate, required=True, help="q in (0, 1]")
        parser.add_argument("--steps", type=steps, required=True, help="number of steps (>= 1)")
        parser.add_argument("--delta", type=delta, required=True, help="delta in (0, 1)")
        parser.add_argument("--accountant", choices=("prv", "rdp", "pld"), default="prv",
                            help="prv (Opacus PRV, PLD-refined; default), rdp (Opacus RDP), pld (Google dp_accounting)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=func)
    plan = sub.add_parser("plan", help="a study's per-stage sigma and cumulative epsilon, before it runs")
    plan.add_argument("config", help="study YAML file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.add_argument("--glue-dir", default=None, help="local GLUE folder when data.dir is unset")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)
    spent = sub.add_parser("spent", help="what each dataset has spent across studies (the dataset ledger)")
    spent.add_argument("--dataset", default=None, metavar="FP", help="one dataset's fingerprint (default: every one)")
    spent.add_argument("--ledger", default=None, metavar="URL",
                       help="SQLAlchemy URL or SQLite path (default: $DPCOMPRESS_LEDGER_URL, else "
                            "$DPCOMPRESS_HOME/ledger.db, $DPCOMPRESS_HOME defaulting to ~/.dpcompress)")
    spent.add_argument("--accountant", choices=("prv", "rdp", "pld"), default=None,
                       help="for each dataset's composed epsilon (default: that of its latest release)")
    spent.add_argument("--json", action="store_true", help="print one JSON object")
    spent.set_defaults(func=cmd_spent)
