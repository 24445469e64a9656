"""The science sweeps in the paper's data regime at CPU scale (sweeps/science_cpu_paper_table5,
6, 7 and _selection): every job composes and every stage validates, and the tables share what the
report says they share: per seed one SFT 1.1 and one SFT 1.2 model for Tables 5 and 6 (Exp2 and
Exp4 are cpu_paper's stages), one grpo_all for the DPA arms of Table 6, every arm of Table 7 and
of the selection sweep, and seeds apart; cpu_paper_lora shares cpu_paper's SFT models and differs
from it in its GRPO stages only by LoRA and its learning rate. Composition only (the runs take
hours on 2 cores); the pipeline itself runs in the tiny chains of tests/test_stage_store.py and
tests/test_sweeps.py."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hcm.config import validate
from hcm.train import compose_stages

REPO = Path(__file__).resolve().parents[1]


def sweep_jobs(sweep_name: str, seed: str) -> list[list[str]]:
    """Each job of one seed, its overrides as Hydra's basic sweeper expands the sweep's params."""
    sweep = OmegaConf.load(REPO / "sweeps" / f"{sweep_name}.yaml")
    params = sweep.hydra.sweeper.params
    axes = [
        [f"{key}={v}" for v in str(values).split(",") if key != "seed" or v == seed]
        for key, values in params.items()
    ]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.slow  # ~16 pipeline compositions, ~60 s
def test_tables_5_6_7_compose_and_share_their_stages(compose_cfg):
    # folders[seed, stage name]["table: arm"] = the stage's folder, for every job of seed 0
    # and, to see that seeds share nothing, cpu_paper of seed 1
    folders: dict[tuple[int, str], dict[str, str]] = defaultdict(dict)
    tables = ("table5", "table6", "table7", "selection")
    jobs = [(t, job) for t in tables for job in sweep_jobs(f"science_cpu_paper_{t}", "0")]
    for table, job in [*jobs, ("table6", ["experiment=cpu_paper", "seed=1"])]:
        cfg = compose_cfg("train", [f"+sweeps=science_cpu_paper_{table}", *job])
        arm = " ".join(o for o in job if not o.startswith("seed="))
        for name, _, stage in compose_stages(cfg):
            validate(stage)
            assert stage.seed == cfg.seed, (job, name)
            assert stage.data.synthetic.sizes.test == 2048, (job, name)
            folders[cfg.seed, name][f"{table}: {arm}"] = stage.paths.output_dir

    def one(name: str, *arms: str) -> bool:
        return len({folders[0, name][a] for a in arms}) == 1

    paper = ("table5: experiment=cpu_paper", "table6: experiment=cpu_paper")
    # Exp2 is cpu_paper's SFT 1.1; Exp4 (the SFT row of Table 6) its SFT 1.2 and evaluation
    assert one("sft_1_1", *paper, "table5: experiment=cpu_paper_exp2")
    assert one("sft_1_2", *paper, "table6: experiment=cpu_paper_plain")
    assert one("sft_eval", *paper, "table6: experiment=cpu_paper_dpa")
    # Exp1 and Exp3 train their own SFT stage
    assert not one("sft_1_1", paper[0], "table5: experiment=cpu_paper_exp1")
    assert not one("sft_1_2", paper[0], "table5: experiment=cpu_paper_exp3")
    # one grpo_all: the DPA arms of Table 6, every composition of Table 7 and every selection
    assert len(set(folders[0, "grpo_all"].values())) == 1
    # Table 7's "all" arm is Table 6's DPA-GRPO, its all + hard arm HCM-GRPO
    table7 = "table7: experiment=cpu_paper data.composition="
    assert one("grpo", f"{table7}all", "table6: experiment=cpu_paper_dpa")
    assert one("grpo", f"{table7}all_plus_hard", "table6: experiment=cpu_paper")
    # the selection sweep's control is Table 7's all + random; its online arms train their own
    assert one("grpo", f"{table7}all_plus_random", "selection: experiment=cpu_paper_random")
    online = [folders[0, "grpo"][f"selection: experiment=cpu_paper_{a}"] for a in ("dapo", "band")]
    assert len(set(online) | {folders[0, "grpo"][f"{table7}all_plus_random"]}) == 3
    for name in ("sft_1_1", "sft_1_2", "sft_eval", "grpo_all", "grpo"):  # seeds share nothing
        assert folders[1, name]["table6: experiment=cpu_paper"] not in folders[0, name].values()


def test_the_lora_variant_shares_sft_and_changes_only_how_grpo_updates(compose_cfg):
    stages = {}  # sweeps/lora_cpu_paper.yaml's two jobs of a seed
    for job in sweep_jobs("lora_cpu_paper", "1"):
        cfg = compose_cfg("train", ["+sweeps=lora_cpu_paper", *job])
        stages[job[0].split("=")[1]] = {name: stage for name, _, stage in compose_stages(cfg)}
    full, lora = stages["cpu_paper"], stages["cpu_paper_lora"]
    assert full.keys() == lora.keys()
    for name in ("sft_1_1", "sft_1_2", "sft_eval"):
        assert full[name].paths.output_dir == lora[name].paths.output_dir, name
    for name in ("grpo_all", "grpo", "grpo_eval"):
        assert full[name].paths.output_dir != lora[name].paths.output_dir, name
    for name in ("grpo_all", "grpo"):
        validate(lora[name])
        assert full[name].module.get("lora") is None and lora[name].module.lora.rank == 16
        assert lora[name].module.optimizer.lr == 10 * full[name].module.optimizer.lr
        # everything else as cpu_paper's: data, whole epochs, the seed
        for key in (
            "data.root",
            "data.val_split",
            "trainer.limit_train_batches",
            "seed",
            "trainer.max_epochs",
            "data.composition",
        ):
            assert OmegaConf.select(full[name], key) == OmegaConf.select(lora[name], key), key


def test_the_cot_error_sweep_reuses_seed_0_and_changes_only_the_data(compose_cfg):
    rate = "data.synthetic.generator.answer_cot_error_rate"
    paper = compose_cfg("train", ["experiment=cpu_paper", "seed=0"])
    stages = {n: s for n, _, s in compose_stages(paper)}
    roots = set()
    for job in sweep_jobs("science_cpu_paper_cot_error", "0"):
        cfg = compose_cfg("train", ["+sweeps=science_cpu_paper_cot_error", *job])
        for name, _, stage in compose_stages(cfg):
            validate(stage)
            same = stage.paths.output_dir == stages[name].paths.output_dir
            assert same == (f"{rate}=0.3" in job), (job, name)  # 0.3: cpu_paper's own stages
            roots.add(stage.data.root)
            assert OmegaConf.select(stage, rate) == float(job[1].split("=")[1]), (job, name)
    assert len(roots) == 3
