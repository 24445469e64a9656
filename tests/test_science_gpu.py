"""The science sweeps at GPU scale (sweeps/science_gpu_table6.yaml, science_gpu_table7.yaml),
checked on CPU (no GPU was available to run them): every job composes and every stage of it
validates; one base model serves every job and seed while SFT varies with the seed; the model has
the size its config states; and gpu_hcm's whole pipeline runs end to end shrunk to tiny sizes,
its stages chained (base -> SFT -> grpo_all -> grpo continuing grpo_all's checkpoint)."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hcm.config import validate
from hcm.data.synthetic.render import FAMILIES
from hcm.model.tiny import TinySizes, build_tiny_model
from hcm.train import compose_stages, train

REPO = Path(__file__).resolve().parents[1]
SWEEPS = ("science_gpu_table6", "science_gpu_table7")
DPA_STAGES = ["base", "sft", "sft_eval", "grpo_all", "grpo", "grpo_eval"]


def sweep_jobs(sweep: str) -> list[list[str]]:
    """Each job's command-line overrides, as Hydra's basic sweeper expands the sweep's params,
    for the first two seeds: a third composes like the second (the seed is one number)."""
    params = OmegaConf.load(REPO / "sweeps" / f"{sweep}.yaml").hydra.sweeper.params
    axes = [
        [f"{key}={v}" for v in str(values).split(",")][: 2 if key == "seed" else None]
        for key, values in params.items()
    ]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.slow  # 25-45 s of CPU each (60 stage compositions for table 7)
@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_job_composes_validates_and_shares_one_base(compose_cfg, sweep):
    folders: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    jobs = sweep_jobs(sweep)
    assert len(jobs) == {"science_gpu_table6": 6, "science_gpu_table7": 10}[sweep]
    for job in jobs:
        cfg = compose_cfg("train", [f"+sweeps={sweep}", *job])
        composed = compose_stages(cfg)
        names = [name for name, _, _ in composed]
        plain = "experiment=gpu_plain_grpo" in job
        assert names == [n for n in DPA_STAGES if not (plain and n == "grpo_all")], job
        for name, _, stage in composed:
            validate(stage)
            folders[name][cfg.seed].add(stage.paths.output_dir)
            trainer = (stage.trainer.accelerator, stage.trainer.precision)
            assert trainer == ("gpu", "bf16-mixed"), (job, name)
            generator = stage.data.synthetic.generator
            assert generator.image_size == 112 and generator.text_style == "compact", (job, name)
            assert set(generator.family_weights.values()) == {1.0}, (job, name)
            assert set(generator.family_weights) == set(FAMILIES), (job, name)
            assert stage.seed == (0 if name == "base" else cfg.seed), (job, name)
    # one base model for every job and seed; one SFT model per seed, shared by its arms
    assert len(set().union(*folders["base"].values())) == 1
    assert [len(f) for f in folders["sft"].values()] == [1, 1]
    assert len(set().union(*folders["sft"].values())) == 2
    # the DPA arms of a seed share their first GRPO epochs
    assert [len(f) for f in folders["grpo_all"].values()] == [1, 1]


def test_the_gpu_model_has_the_size_its_config_states(compose_cfg):
    cfg = compose_cfg("train", ["experiment=gpu_base"])
    spec = OmegaConf.to_container(cfg.model.tiny)
    seed, _ = spec.pop("seed"), spec.pop("max_patches")
    sizes = TinySizes(**spec)
    model = build_tiny_model(sizes, seed)
    params = sum(p.numel() for p in model.parameters())
    assert 18.9e6 < params < 19.1e6, params  # conf/model/gpu_small.yaml: 19.0M
    assert sizes.image_seq_length == 49
    assert sizes.image_size == cfg.data.synthetic.generator.image_size


# gpu_hcm shrunk to tiny: the base stage builds a tiny random model instead of the 19M one, and
# every stage runs one batch on CPU (as sweeps/tiny_overlay.yaml shrinks the tiny twins); the
# switch stays after epoch 1 of 2, since grpo_all stops there and grpo continues from it.
TINY_BASE = {
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 2,
    "vision_intermediate_size": 64,
    "patch_size": 28,  # 112-px images: 4x4 patches, 4 tokens after pixel shuffle
    "text_hidden_size": 64,
    "text_num_hidden_layers": 2,
    "text_num_attention_heads": 4,
    "text_num_key_value_heads": 2,
    "text_intermediate_size": 128,
}
SHRINK = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "data.switch_epoch=1",
    "++trainer.limit_train_batches=1",
    "trainer.limit_val_batches=0",
    "++trainer.limit_test_batches=1",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "++callbacks.progress_bar=null",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.limit_eval=4",
    "data.num_workers=0",
    "data.synthetic.workers=1",
    "data.synthetic.sizes.train=8",
    "data.synthetic.sizes.test=4",
    "max_completion_length=8",
]


@pytest.mark.slow
def test_gpu_hcm_pipeline_runs_end_to_end_shrunk(compose_cfg, tmp_path):
    base = [f"model.name_or_path={tmp_path / 'tiny-init'}"]
    base += [f"model.tiny.{key}={value}" for key, value in TINY_BASE.items()]
    cfg = compose_cfg(
        "train",
        [
            "experiment=gpu_hcm",
            "seed=1",
            "pipeline.base.overrides=[" + ",".join(f"'{o}'" for o in base) + "]",
            *SHRINK,
        ],
    )
    train(cfg)
    stages = Path(cfg.paths.output_dir) / "stages"
    marker = {name: json.loads((stages / name / "stage.json").read_text()) for name in DPA_STAGES}
    folder = {name: (stages / name).resolve() for name in DPA_STAGES}
    assert marker["base"]["config"]["model"]["tiny"]["text_hidden_size"] == 64
    assert marker["base"]["config"]["seed"] == 0 and marker["sft"]["config"]["seed"] == 1
    assert marker["sft"]["init_model"] == str(folder["base"] / "model")
    assert marker["grpo_all"]["init_model"] == str(folder["sft"] / "model")
    assert marker["grpo"]["init_model"] == marker["grpo_all"]["init_model"]
    assert marker["grpo"]["init_ckpt"] == str(folder["grpo_all"] / "checkpoints/last.ckpt")
    assert marker["grpo_all"]["config"]["data"]["composition"] == "all"
    assert marker["grpo"]["config"]["data"]["composition"] == "all_plus_hard"
    assert marker["grpo"]["hard_cases"]["count"] > 0  # the random tiny model answers wrongly
    for name in ("sft_eval", "grpo_eval"):
        assert marker[name]["metrics"]["test/score/count"] == 4.0, name
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert {"sft_eval", "grpo_eval"} <= set(summary["stages"])
