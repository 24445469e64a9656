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
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from hcm import stages
from hcm.config import validate
from hcm.console import banner
from hcm.runtime import finish_loggers, make_callbacks, make_loggers, resolve_precision
from hcm.summary import write_summary

log = logging.getLogger(__name__)


def metrics_of(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Fit one SFT or GRPO stage and export its model; skipped when already finished."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    done = stages.finished(output_dir, cfg)
    if done is not None:
        log.info("stage in %s already finished; skipping", output_dir)
        return done.get("metrics", {})
    resolve_precision(cfg)
    ckpt_path = stages.last_checkpoint(cfg, output_dir)  # checked before anything loads
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    loggers = make_loggers(cfg)
    try:
        trainer = instantiate(cfg.trainer, callbacks=make_callbacks(cfg), logger=loggers or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = metrics_of(trainer)
        if trainer.is_global_zero:
            from hcm.model.loading import load_image_processor

            model_dir = stages.export_model(
                module.model,
                module.tokenizer,
                load_image_processor(module.model_path, cfg.model.trust_remote_code),
                output_dir,
            )
            stages.write_marker(
                output_dir,
                cfg,
                kind=cfg.job_type,
                init_model=str(cfg.model.name_or_path),
                model_dir=str(model_dir),
                manifest_hashes=datamodule.manifest_hashes(),
                metrics=metrics,
            )
        return metrics
    finally:
        finish_loggers(loggers)


def compose_stages(cfg: DictConfig) -> list[tuple[str, str, DictConfig]]:
    """(name, kind, config) of each pipeline stage, composed as its own experiment."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

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
    root = Path(cfg.paths.output_dir) / "stages"
    composed = []
    for name, stage in cfg.pipeline.items():
        if stage is None:  # an experiment may drop an inherited stage with `name: null`
            continue
        overrides = [f"paths.output_dir={root / name}", f"task_name={cfg.task_name}/{name}"]
        if stage.get("experiment"):
            overrides.insert(0, f"experiment={stage.experiment}")
        # One completion budget for the whole pipeline (rollouts, mining, validation, eval):
        # the pipeline's, over a stage experiment's own; a stage's `overrides` may still set it.
        overrides.append(f"max_completion_length={cfg.max_completion_length}")
        if stage.get("init_from"):
            if stage.init_from not in [n for n, _, _ in composed]:
                raise ValueError(
                    f"stage {name!r}: init_from {stage.init_from!r} is no earlier stage"
                )
            # an exported model: load it as is (never build the tiny model there)
            overrides += [
                f"model.name_or_path={root / stage.init_from / 'model'}",
                "model.tiny=null",
            ]
        overrides += [*stage.get("overrides", []), *user_overrides]
        kind = stage.get("kind", "train")
        stage_cfg = compose(config_name="eval" if kind == "eval" else "train", overrides=overrides)
        with open_dict(stage_cfg):
            stage_cfg.pipeline = {}
        log.debug("pipeline stage %s (%s): %s", name, kind, " ".join(overrides))
        composed.append((name, kind, stage_cfg))
    return composed


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg.pipeline`'s stages in order, after checking every stage's config up front:
    a bad override of the last stage fails before the first one trains."""
    from hcm.evaluate import evaluate

    composed = compose_stages(cfg)
    for _, _, stage_cfg in composed:
        validate(stage_cfg)
    metrics: dict[str, Any] = {}
    for i, (name, kind, stage_cfg) in enumerate(composed, start=1):
        stage_banner(f"stage {i}/{len(composed)}: {name} ({stage_cfg.job_type})", stage_cfg)
        metrics = evaluate(stage_cfg) if kind == "eval" else run_stage(stage_cfg)
    if rank_zero_only.rank == 0:  # DDP: every rank runs the pipeline
        write_summary(Path(cfg.paths.output_dir), [name for name, _, _ in composed])
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
