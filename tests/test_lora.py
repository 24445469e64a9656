"""LoRA stages (conf/lora/, hcm/model/lora.py) on the tiny model: which weights train and in which
dtype, GRPO's reference as the base model, the merged export and the adapter alone, the stage
identity and mining key, a killed LoRA pipeline resuming to the uninterrupted result, the LoRA
tiny_hcm chain end to end, and the paper's LoRA pipelines composed stage by stage."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import letter_e, toy_reward_site
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from test_grpo_module import build, first_prompts, fit, rollout
from test_resume import logged, train_cli

from hcm import stages
from hcm.model import lora
from hcm.model.loading import load_image_processor, load_model
from hcm.rewards import REWARDS
from hcm.train import compose_stages, train

COMPONENTS = ("vision_tower", "multi_modal_projector", "language_model")


def adapted_components(model) -> set[str]:
    return {c for c in COMPONENTS for k in model.state_dict() if lora.is_adapter_key(k) and c in k}


@pytest.mark.parametrize(
    ("experiment", "trained"),
    [("tiny_sft", {"language_model"}), ("tiny_grpo", set(COMPONENTS))],  # Table 2's freezing
)
def test_adapters_train_in_fp32_where_freeze_allows_and_the_base_stays_in_model_dtype(
    compose_cfg, experiment, trained
):
    cfg = compose_cfg("train", [f"experiment={experiment}", "lora=default", "model.dtype=bf16"])
    module = instantiate(cfg.module, _convert_="all")
    module.configure_model()
    assert adapted_components(module.model) == trained
    assert getattr(module, "ref_model", None) is None  # GRPO: no second model
    for name, p in module.model.named_parameters():
        adapter = lora.is_adapter_key(name)
        assert p.requires_grad == adapter, name
        assert p.dtype == (torch.float32 if adapter else torch.bfloat16), name


def test_grpo_trains_only_adapters_against_the_base_and_exports_them_merged(
    compose_cfg, monkeypatch, tmp_path
):
    monkeypatch.setitem(REWARDS, "letter_e", letter_e)  # rewards that vary: a gradient
    overrides = ["lora=default", "+module.rewards.letter_e=1.0", "module.optimizer.lr=1.0e-2"]
    cfg, dm, module = build(compose_cfg, *overrides, "module.lora.save_adapter=true")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit(cfg, dm, module, steps=2)
    after = module.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(lora.is_adapter_key(k) for k in changed), changed
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)

    # pi_ref is the base model: the policy with its adapters off, to 1e-6
    torch.manual_seed(0)
    r = rollout(module, first_prompts(dm))
    rows = list(range(r.size))
    base = load_model(module.model_path, dtype="fp32")
    want = module._logprobs(base, r, rows)  # (B*G, L)
    assert (r.ref_logprobs - want).abs().max() < 1e-6
    with torch.no_grad():
        adapted = module._logprobs(module.model, r, rows)  # (B*G, L)
    assert (adapted - want).abs().max() > 1e-3  # the adapters moved the policy

    # the merged export (and the adapter alone, on the base) score as the adapted module
    image_processor = load_image_processor(module.model_path)
    folder = stages.export_model(
        module.exported_model(tmp_path), module.tokenizer, image_processor, tmp_path
    )
    merged = load_model(folder, dtype="fp32")
    assert not [k for k in load_file(folder / "model.safetensors") if "lora" in k]
    with torch.no_grad():
        assert (module._logprobs(merged, r, rows) - adapted).abs().max() < 1e-5
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
        alone = module._logprobs(peft_model.base_model.model, r, rows)
    assert (alone - adapted).abs().max() < 1e-5


def test_lora_settings_enter_the_stage_identity(compose_cfg):
    variants = [
        [],
        ["lora=default"],
        ["lora=default", "module.lora.rank=8"],
        ["lora=default", "module.lora.target_modules=[q_proj,v_proj]"],
    ]
    hashes = {
        stages.config_hash(compose_cfg("train", ["experiment=tiny_grpo", *v])) for v in variants
    }
    assert len(hashes) == len(variants)
    assert (
        "lora"
        in stages.identity(compose_cfg("train", ["experiment=tiny_sft", "lora=default"]))["module"]
    )


def test_lora_on_a_pipelines_command_line_reaches_its_training_stages_only(compose_cfg):
    cfg = compose_cfg("train", ["experiment=tiny_hcm", "lora=default", "module.lora.rank=4"])
    ranks = {n: OmegaConf.select(c, "module.lora.rank") for n, _, c in compose_stages(cfg)}
    assert ranks == {"sft_1_1": 4, "sft_1_2": 4, "grpo": 4, "eval": None}


# A LoRA SFT stage then a LoRA GRPO stage (from the random tiny model), killed mid-SFT and mid-GRPO
# in the hard-case epoch, as tests/test_resume.py does with full fine-tuning.
PIPELINE = [
    "experiment=tiny_hcm_lora",
    "pipeline.sft_1_1=null",
    "pipeline.sft_1_2.init_from=null",
    "pipeline.eval=null",
    "pipeline.grpo.overrides=['data.composition=all_plus_hard','+module.rewards.letter_e=1.0',"
    "'checkpoint_every_n_steps=1']",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=0",
    "callbacks.progress_bar=null",
    "keep_checkpoints=true",  # read below: what a LoRA checkpoint holds
]


@pytest.mark.slow
def test_killed_lora_pipeline_resumes_to_the_uninterrupted_result(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(toy_reward_site())
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = train_cli(ref, site, pipeline=PIPELINE)
    assert r.returncode == 0, r.stderr[-3000:]
    for fault in ("sft_step:5", "grpo_step:5"):
        r = train_cli(run, site, fault, pipeline=PIPELINE)
        assert r.returncode == -signal.SIGKILL, f"{fault} did not fire: {r.stderr[-2000:]}"
    r = train_cli(run, site, pipeline=PIPELINE)
    assert r.returncode == 0, r.stderr[-3000:]

    for stage, resumed_at in (("sft_1_2", 3), ("grpo", 4)):
        want, got = logged(ref / "stages" / stage), logged(run / "stages" / stage)
        last = logged(run / "stages" / stage, "metrics.csv")
        assert {s for s, _ in last} == set(range(resumed_at, 6)), stage
        assert got and {k: want.get(k) for k in got} == got, stage
        a, b = (d / "stages" / stage / "model" / "model.safetensors" for d in (ref, run))
        assert a.read_bytes() == b.read_bytes(), stage
        # the checkpoint holds the adapters and their optimizer state, not the base
        ckpt = torch.load(run / "stages" / stage / "checkpoints/last.ckpt", weights_only=False)
        weights = [k for k in ckpt["state_dict"] if k.startswith("model.")]
        assert weights and all(lora.is_adapter_key(k) for k in weights), stage
        assert len(ckpt["optimizer_states"][0]["state"]) == len(weights), stage
    kls = [float(v) for (_, k), v in logged(ref / "stages" / "grpo").items() if k == "train/kl"]
    assert max(kls) > 0  # the adapters moved the policy off the reference


@pytest.mark.slow
def test_tiny_hcm_lora_chain_runs_end_to_end(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train",
        ["experiment=tiny_hcm_lora", "trainer.limit_train_batches=2"],
    )
    metrics = train(cfg)
    assert "test/score/overall" in metrics
    folder = Path(cfg.paths.output_dir) / "stages"
    exported = {
        s: load_file(folder / s / "model" / "model.safetensors") for s in ("sft_1_1", "sft_1_2")
    }
    assert not [k for k in exported["sft_1_2"] if "lora" in k]  # a plain InternVL3
    # SFT trains the language model only (Table 2): merged adapters changed nothing else
    for key, value in exported["sft_1_2"].items():
        same = torch.equal(value, exported["sft_1_1"][key])
        trained = key.startswith("language_model.model.layers.") and key.endswith("proj.weight")
        assert same != trained, key
    hard = json.loads((folder / "grpo" / "hard_cases.json").read_text())["content"]
    assert hard["params"]["lora"]["rank"] == 16  # the mining cache key has the LoRA settings
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft_1_1", "sft_1_2", "grpo", "eval"]


@pytest.mark.parametrize("size", ["1b", "2b"])
def test_paper_lora_pipelines_compose_with_lora_stages(compose_cfg, size):
    full = {n: c for n, _, c in compose_stages(compose_cfg("train", [f"experiment=hcm_{size}"]))}
    cfg = compose_cfg("train", [f"experiment=hcm_{size}_lora"])
    composed = {name: stage for name, _, stage in compose_stages(cfg)}
    assert list(composed) == list(full)
    for name, stage in composed.items():
        if name == "eval":  # scores the merged export: no adapters
            assert "module" not in stage
            continue
        assert stage.module.lora.rank == 16
        assert stage.module.optimizer.lr == pytest.approx(10 * full[name].module.optimizer.lr)
        assert stage.module.freeze == full[name].module.freeze
        # nothing else differs but the init model (an upstream LoRA stage's export)
        changed = stages.continuation_changes(full[name], stage)
        lora_keys = ("module.lora.", "module.optimizer.lr")
        assert changed and all(
            k.startswith(lora_keys) or k.endswith("model.name_or_path") for k in changed
        ), changed
