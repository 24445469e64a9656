"""train(cfg): run one stage, or a pipeline of stages, from a composed Hydra config.

A single stage (`experiment=tiny_sft`) trains in its run folder and exports its model there.
A pipeline (`experiment=tiny_hcm`) composes each stage's own experiment config, with the user's
command-line overrides applied to every stage, runs it in `<output_dir>/stages/<name>`, and
skips stages whose `stage.json` says they finished with the same config: a rerun resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from hcm import stages
from hcm.config import ConfigError, validate
from hcm.console import banner
from hcm.evaluate import evaluate_data
from hcm.model.loading import load_image_processor
from hcm.modules.base import logged_metrics
from hcm.runtime import finish_loggers, make_callbacks, make_loggers, resolve_precision
from hcm.summary import write_summary

log = logging.getLogger(__name__)
_NO = object()  # OmegaConf.select's answer for a key the config does not have


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Fit one SFT or GRPO stage and export its model; skipped when already finished."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    key, done = stages.previous_run(cfg)
    if done is not None:
        return done
    resolve_precision(cfg)
    # checked before anything loads: this stage's own checkpoint, else where it continues from
    ckpt_path = stages.last_checkpoint(cfg, output_dir) or stages.start_checkpoint(cfg)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    loggers = make_loggers(cfg)
    try:
        trainer = instantiate(cfg.trainer, callbacks=make_callbacks(cfg), logger=loggers or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # (a resume from the final checkpoint logs nothing: the checkpoint's metrics stand)
        metrics = module.restored_metrics | logged_metrics(trainer)
        if trainer.is_global_zero:
            model_dir = stages.export_model(
                module.exported_model(output_dir),  # LoRA: the adapters merged in
                module.tokenizer,
                load_image_processor(module.model_path, cfg.model.trust_remote_code),
                output_dir,
            )
            stages.write_marker(
                output_dir,
                cfg,
                key,
                kind=cfg.job_type,
                init_model=str(cfg.model.name_or_path),
                init_ckpt=cfg.get("init_ckpt"),
                hard_cases=stages.hard_set_digest(datamodule.hard_indices),
                model_dir=str(model_dir),
                manifest_hashes=datamodule.manifest_hashes(),
                inputs=stages.stage_inputs(cfg, datamodule.read_manifests()),
                metrics=metrics,
            )
            stages.release_checkpoints(cfg, output_dir)
        return metrics
    finally:
        finish_loggers(loggers)


def compose_stages(cfg: DictConfig) -> list[tuple[str, str, DictConfig]]:
    """(name, kind, config) of each pipeline stage, composed as its own experiment.

    Each stage's folder is `<stage_store>/<name>-<hash of what it computes>` (`stages.identity`),
    so the jobs of a sweep that share a stage (the SFT model of every Table 6 row, the first
    switch_epoch epochs of Table 7's arms) share its folder, and `<output_dir>/stages/<name>`
    links to it. With `paths.stage_store: null` every job trains its stages in its own folder.
    """
    # The user's overrides apply to every stage, except those about the pipeline run itself.
    own = (
        "experiment=",
        "task_name=",
        "pipeline",
        "+pipeline",
        "~pipeline",
        "hydra.",
        "ckpt_path=",
    )
    user_overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(own)]
    groups = set(HydraConfig.get().runtime.choices)
    routed_somewhere: set[str] = set()
    root = Path(cfg.paths.output_dir) / "stages"
    store = cfg.paths.get("stage_store")
    composed: list[tuple[str, str, DictConfig]] = []
    by_name: dict[str, DictConfig] = {}  # the stages composed so far
    inits: dict[str, list[str]] = {}  # stage -> the overrides that set its initial model
    for name, stage in cfg.pipeline.items():
        if stage is None:  # an experiment may drop an inherited stage with `name: null`
            continue
        folders = {n: Path(c.paths.output_dir) for n, c in by_name.items()}
        overrides = [f"paths.output_dir={root / name}", f"task_name={cfg.task_name}/{name}"]
        if stage.get("experiment"):
            overrides.insert(0, f"experiment={stage.experiment}")
        # One completion budget for the whole pipeline (rollouts, mining, validation, eval):
        # the pipeline's, over a stage experiment's own; a stage's `overrides` may still set it.
        overrides.append(f"max_completion_length={cfg.max_completion_length}")
        inits[name] = []
        for key in ("init_from", "continue_from"):
            if stage.get(key) and stage[key] not in folders:
                raise ValueError(f"stage {name!r}: {key} {stage[key]!r} is no earlier stage")
        if stage.get("continue_from"):
            # the stage it continues: the same initial model (the KL reference and the miner),
            # and its trainer state at the end (weights, optimizer, schedule, data order, RNG)
            inits[name] = inits[stage.continue_from]
            overrides.append(f"init_ckpt={folders[stage.continue_from] / 'checkpoints/last.ckpt'}")
        elif stage.get("init_from"):
            # an exported model: load it as is (never build the tiny model there)
            model = folders[stage.init_from] / "model"
            inits[name] = [f"model.name_or_path={model}", "model.tiny=null"]
        overrides += [*inits[name], *stage.get("overrides", [])]
        fixed = list(stage.get("fixed", []))  # the stage's own, over the command line's
        kind = stage.get("kind", "train")
        config_name = "eval" if kind == "eval" else "train"
        user = routed(config_name, overrides, user_overrides, fixed, groups)
        routed_somewhere.update(user)
        stage_cfg = compose(config_name=config_name, overrides=[*overrides, *user, *fixed])
        if stage.get("continue_from"):
            changed = stages.continuation_changes(by_name[stage.continue_from], stage_cfg)
            if changed:
                raise ConfigError(
                    f"stage {name!r} continues {stage.continue_from!r} but differs from it in "
                    f"{', '.join(changed)}: only {', '.join(stages.CONTINUATION_MAY_CHANGE)} may"
                )
        with open_dict(stage_cfg):
            stage_cfg.pipeline = {}
            # the identity of the stage it starts from: with the store off (fixed folders), a
            # retrained SFT stage still makes every stage after it another stage
            start = stage.get("continue_from") or stage.get("init_from")
            if start:
                stage_cfg.upstream = {start: stages.config_hash(by_name[start])}
            if store:
                folder = Path(store) / f"{name}-{stages.config_hash(stage_cfg)}"
                stage_cfg.paths.output_dir = str(folder)
        log.debug("pipeline stage %s (%s): %s", name, kind, " ".join(overrides))
        if stage.get("continue_from"):  # its checkpoint is where this stage starts
            with open_dict(by_name[stage.continue_from]):
                by_name[stage.continue_from].keep_checkpoints = True
        composed.append((name, kind, stage_cfg))
        by_name[name] = stage_cfg
    unrouted = [o for o in user_overrides if o not in routed_somewhere]
    # `+key` adds a key no stage has: a typo. `++key` sets it wherever it exists, and is what a
    # sweep shares across pipelines whose stages differ (an eval-only one has no `callbacks`).
    # (a group the job itself chose, such as +sweeps=table6, is no key)
    added = [
        o.input_line
        for o in OverridesParser.create().parse_overrides(unrouted)
        if o.is_add() and o.key_or_group not in groups
    ]
    if added:
        raise ConfigError(
            f"{', '.join(added)}: no stage of this pipeline ({', '.join(by_name)}) has a place "
            "for that key; check its spelling in conf/ (python train.py --help)"
        )
    if unrouted:  # a real knob (the job's config has it) that this pipeline's stages lack
        log.warning("%s: no stage of this pipeline (%s) has that key", unrouted, list(by_name))
    return composed


def routed(
    config_name: str, stage: list[str], user: list[str], fixed: list[str], groups: set[str]
) -> list[str]:
    """The command line's overrides that a stage has a place for: a group choice (model=tiny)
    where the stage's config has that group (lora=default: training stages, not evaluation); a
    value where it has the key (for +key and ++key, its parent). So `module.beta=0.1` reaches a
    pipeline's GRPO stages and leaves SFT and evaluation alone, which have no such key."""
    parsed = OverridesParser.create().parse_overrides(user)
    bare = compose(config_name=config_name, overrides=[*stage, *fixed], return_hydra_config=True)
    own_groups = set(bare.hydra.runtime.choices)
    choices = [o.input_line for o in parsed if o.key_or_group in groups & own_groups]
    base = compose(config_name=config_name, overrides=[*stage, *choices, *fixed])
    keep = []
    for o in parsed:
        key = o.key_or_group
        if key in groups:
            if key in own_groups:
                keep.append(o.input_line)
            continue
        if o.is_add() or o.is_force_add():
            key = key.rpartition(".")[0]  # +a.b=1 needs `a`; +seed2=1 needs nothing
        if not key or OmegaConf.select(base, key, default=_NO) is not _NO:
            keep.append(o.input_line)
    return keep


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.pipeline`'s stages in order, after checking every stage's config up front:
    a bad override of the last stage fails before the first one trains. A stage another job is
    running (a shared folder) is waited for, then read."""
    composed = compose_stages(cfg)
    for _, _, stage_cfg in composed:
        validate(stage_cfg)
    if cfg.paths.get("stage_store"):  # the job's stages/<name>: a link to the store's folder
        for name, _, stage_cfg in composed:
            stages.link(
                Path(cfg.paths.output_dir) / "stages" / name, Path(stage_cfg.paths.output_dir)
            )
    metrics: dict[str, Any] = {}
    for i, (name, kind, stage_cfg) in enumerate(composed, start=1):
        stage_banner(f"stage {i}/{len(composed)}: {name} ({stage_cfg.job_type})", stage_cfg)
        run = run_eval_stage if kind == "eval" else run_stage
        with stages.claim(Path(stage_cfg.paths.output_dir)):
            metrics = run(stage_cfg)
    if rank_zero_only.rank == 0:  # DDP: every rank runs the pipeline
        write_summary(Path(cfg.paths.output_dir), [name for name, _, _ in composed])
    return metrics


def run_eval_stage(cfg: DictConfig) -> dict[str, Any]:
    """A pipeline's evaluation, skipped when its folder holds this config's results."""
    key, done = stages.previous_run(cfg)
    if done is not None:
        return done
    metrics, datamodule = evaluate_data(cfg)
    if rank_zero_only.rank == 0:
        inputs = stages.stage_inputs(cfg, datamodule.read_manifests())
        stages.write_marker(
            Path(cfg.paths.output_dir), cfg, key, kind="eval", inputs=inputs, metrics=metrics
        )
    return metrics


def stage_banner(title: str, cfg: DictConfig) -> None:
    if rank_zero_only.rank == 0:
        init = cfg.get("ckpt_path") if cfg.job_type == "eval" else None
        banner(title, str(init or cfg.model.name_or_path), str(cfg.paths.output_dir))


def train(cfg: DictConfig) -> dict[str, Any]:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    if cfg.get("pipeline"):
        return run_pipeline(cfg)
    stage_banner(f"stage: {cfg.job_type}", cfg)
    return run_stage(cfg)
