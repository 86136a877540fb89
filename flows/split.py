"""The Split-and-Privatize branch of a study (`split` section), run after the results table: public text for the
attacks -> one split fine-tuning per configuration (split depth, eta, CTI), each a cached stage under local d_chi
noise, recorded beside (never inside) the study's epsilon -> the inversion attacks of each depth -> the table."""
from __future__ import annotations

from flows.config import StudyConfig
from flows.config_split import attack_config, public_sources, split_configs
from tasks.data import prepare_data
from tasks.refs import DataRef, RunContext
from tasks.split import split_attack, split_stage, split_table


def run_split(cfg: StudyConfig, *, data: DataRef, output_dir: str, context: RunContext) -> list[dict]:
    """Every configuration of `cfg.split` on the study's private `data`; returns the rows of the split table."""
    s = cfg.split
    public = [prepare_data(stage=f"prepare_public_{source.task}", data=source, private=data,
                           tokenizer_name=cfg.model.name_or_path, output_dir=output_dir, context=context)
              for source in public_sources(s, cfg.data)]
    configs, seeded = split_configs(s), cfg.privacy.reproducible_noise  # seeded: the test mode, no guarantee
    stages = [split_stage(stage=name, config=config, data=data, model=cfg.model,
                          max_train_examples=s.max_train_examples, seeded=seeded, output_dir=output_dir,
                          context=context) for name, config in configs.items()]
    attacks = [split_attack(split_layer=k, stages=[r for r in stages if r.split_layer == k],
                            configs={n: c for n, c in configs.items() if c.split_layer == k}, data=data,
                            public=public, model=cfg.model, settings=attack_config(s),
                            max_train_examples=s.max_train_examples, seeded=seeded, output_dir=output_dir,
                            tracking_uri=context.tracking_uri) for k in s.splits]
    return split_table(stages=stages, attacks=attacks, metric=data.metric, tracking_uri=context.tracking_uri,
                       parent_run_id=context.parent_run_id, output_dir=output_dir)
