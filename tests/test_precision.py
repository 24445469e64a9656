"""Trainable weights are held in fp32 whatever `model.dtype` says: with bf16 weights, AdamW's
updates at the paper's learning rates mostly round away (an update of lr 1e-6 on a weight of
0.02 is 5e-5 of it; bf16 resolves 4e-3). bf16 autocast still computes in bf16, and the frozen
reference model keeps `model.dtype`.

The tiny model runs on CPU in bf16 too, so the check is the paper's situation in small: a few
SFT and GRPO steps at lr 1e-6 with `model.dtype=bf16` under bf16 autocast must move as many of
the trained weights (in the exported model) as the same run with fp32 weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import letter_e
from hydra.utils import instantiate
from safetensors.torch import load_file

import hcm.train
from hcm.config import RULES, validate
from hcm.rewards import REWARDS
from hcm.train import train

QUIET = [
    "logger=none",
    "trainer.precision=bf16-mixed",
    "module.optimizer.lr=1.0e-6",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint=null",
    "callbacks.lr_monitor=null",
]
SFT = ["experiment=tiny_sft", "+trainer.limit_train_batches=3", *QUIET]
# The random tiny model earns no screening reward: a toy reward gives GRPO a gradient.
GRPO = [
    "experiment=tiny_grpo",
    "trainer.limit_train_batches=2",
    "data.composition=all",
    "max_completion_length=8",
    "~module.rewards",
    "+module.rewards={letter_e:1.0}",
    "prompt.user='Original <image> Generated <image> Answer:'",
    "model.max_patches=1",
    *QUIET,
]


def moved_fraction(run: Path, init: dict[str, torch.Tensor], trained: tuple[str, ...]) -> float:
    """Fraction of the trained weights' elements that differ from the initial model's, each
    compared in the dtype it was saved in."""
    saved = load_file(run / "model" / "model.safetensors")
    moved = total = 0
    for name, value in saved.items():
        if any(part in name for part in trained):
            moved += int((value != init[name].to(value.dtype)).sum())
            total += value.numel()
    assert total > 0
    return moved / total


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "trained"),
    [(SFT, ("language_model", "lm_head")), (GRPO, ("vision_tower", "projector", "language_model"))],
    ids=["sft", "grpo"],
)
def test_bf16_weights_train_as_much_as_fp32_weights(
    compose_cfg, tmp_path, hcm_root, monkeypatch, stage, trained
):
    monkeypatch.setitem(REWARDS, "letter_e", letter_e)
    # the rewards rule lists the rewards known at import: let it pass the toy one
    rules = tuple(r for r in RULES if r.key != "module.rewards")
    monkeypatch.setattr(hcm.train, "validate", lambda cfg: validate(cfg, rules))
    fractions = {}
    for dtype in ("bf16", "fp32"):
        cfg = compose_cfg("train", [*stage, f"model.dtype={dtype}"])
        cfg.paths.output_dir = str(tmp_path / dtype)
        train(cfg)
        init = load_file(Path(cfg.model.name_or_path) / "model.safetensors")
        fractions[dtype] = moved_fraction(tmp_path / dtype, init, trained)
    # Embedding rows of tokens never seen do not move, in either run.
    assert fractions["fp32"] > 0.3, fractions
    assert fractions["bf16"] == pytest.approx(fractions["fp32"], abs=0.02), fractions


def test_trainable_weights_are_fp32_and_the_frozen_reference_keeps_model_dtype(compose_cfg):
    cfg = compose_cfg("train", ["experiment=tiny_grpo", "model.dtype=bf16"])
    module = instantiate(cfg.module, _convert_="all")
    module.configure_model()
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert {p.dtype for p in module.ref_model.parameters()} == {torch.bfloat16}
    sft = compose_cfg("train", ["experiment=tiny_sft", "model.dtype=bf16"])
    module = instantiate(sft.module, _convert_="all")
    module.configure_model()
    assert all(p.dtype == torch.float32 for p in module.model.parameters() if p.requires_grad)
