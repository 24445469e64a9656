"""GRPOModule on the tiny model, built from the real composed config (experiment=tiny_grpo):
rollout layout and masks, banned image tokens, mini-batch gradients, mu > 1, the reference model,
DAPO's redraw, the difficulty band, checkpoints and what is logged (the rollout count included)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import letter_e
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch import nn

import hcm.modules.grpo as grpo_module
from hcm.grpo_math import group_advantages
from hcm.model.generation import banned_token_ids
from hcm.model.inputs import tiles_per_row
from hcm.rewards import REWARDS, score
from hcm.rollout import Rollout, loss_share, minibatches, pad_right
from hcm.screening_score import ScreeningScore

G = 4
# Short prompts and one tile per image keep a step on the tiny model well under a second.
FAST = [
    "experiment=tiny_grpo",
    "prompt.user='Original <image> Generated <image> Answer:'",
    "model.max_patches=1",
    "module.sampling.max_new_tokens=6",
    "trainer.limit_val_batches=0",
]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on shared cores: intra-op threads only add contention (7x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(compose_cfg, *overrides: str):
    cfg = compose_cfg("train", [*FAST, *overrides])
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    module = instantiate(cfg.module, _convert_="all")
    module.configure_model()
    return cfg, dm, module


def first_prompts(dm, n: int = 2) -> dict:
    return dm.prompt_collate([dm.train_dataset[i] for i in range(n)])


def uneven_prompts(dm) -> dict:
    """Two prompts of different lengths (left padding) and tile counts (3 and 1)."""
    rng = np.random.default_rng(0)

    def conv(h, w, text):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    builder = dm.prompt_collate.builder
    inputs = builder.encode(
        [conv(56, 112, "Which of the four candidates is fine?"), conv(56, 56, "A")],
        add_generation_prompt=True,
        padding_side="left",
    )
    return {"inputs": inputs, "answers": ["A", "BC"]}


def rollout(module, batch):
    """The part of training_step before the update: completions, rewards, advantages and the
    fixed log-probs."""
    r = module.generate(batch)
    module.reward(r)
    r.advantages = group_advantages(r.rewards, module.G, module.advantage_scale)
    r.old_logprobs, r.ref_logprobs = module.fixed_logprobs(r)
    return r


def banned_in_completions(rollout, banned: list[int]) -> set[int]:
    ids = rollout.input_ids[:, -rollout.completion_mask.shape[1] :]
    return set(ids[rollout.completion_mask.bool()].tolist()) & set(banned)


def favour(module, token_ids: list[int], bias: float = 30.0) -> None:
    """Add `bias` to the policy's logits of `token_ids` at every position."""
    old = module.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token_ids] = bias
    module.model.lm_head = head


def backward_without_trainer(module) -> None:
    # manual_backward needs a Trainer; outside one it is a plain backward.
    module.manual_backward = lambda loss: loss.backward()


def vary_lengths(rollout, lengths: list[int]) -> None:
    """Cut row i of the rollout to lengths[i] completion tokens (a valid, shorter rollout)."""
    L = rollout.completion_mask.shape[1]
    for i, n in enumerate(lengths):
        rollout.completion_mask[i, n:] = 0
        rollout.attention_mask[i, -L + n :] = 0


# -- pure helpers ----------------------------------------------------------------------------------
def test_minibatches_cover_rows_in_order():
    assert minibatches(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert minibatches(8, None) == [list(range(8))]
    assert minibatches(4, 8) == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("agg", "expected"),
    [("sequence_mean", 2 / 8), ("token_mean", 5 / 20)],  # 2 of 8 rows; 5 of 20 tokens
)
def test_loss_share(agg, expected):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert loss_share(mask, 8, 20, agg) == pytest.approx(expected)


def test_pad_right_widens_to_the_longest():
    out = pad_right([torch.ones(2, 3, dtype=torch.long), torch.full((1, 5), 7)], value=0)
    assert out.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [7, 7, 7, 7, 7]]


# -- rollout ---------------------------------------------------------------------------------------
def test_keep_prompts_takes_whole_groups_and_cuts_only_padding():
    """3 prompts x G=2 (tiles 1, 2, 1; completions 3, 1, 2 tokens wide at most): keeping prompts
    2 and 0 keeps their rows, tiles and labels in that order and 3 of the 4 completion columns."""
    lengths = [3, 2, 1, 1, 2, 1]  # per row; the widest kept row (prompt 0's) has 3
    P, L = 2, 4
    completion_mask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])  # (6, 4)
    ids = torch.arange(6 * (P + L)).view(6, P + L)
    r = Rollout(
        G=2,
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(6, P, dtype=torch.long), completion_mask], 1),
        completion_mask=completion_mask,
        truncated=torch.tensor([False, True, False, False, True, False]),
        pixel_values=torch.arange(4.0).view(4, 1, 1, 1),  # prompt 0: tile 0; 1: 1-2; 2: 3
        tiles=[1, 2, 1],
        texts=[f"t{i}" for i in range(6)],
        answers=["A", "A", "B", "B", "C", "C"],
        labels={"answers": ["A", "A", "B", "B", "C", "C"]},
        rewards=torch.arange(6.0),
        per_reward={"dpa": torch.arange(6.0) / 10},
    )
    r.keep_prompts([2, 0])
    rows = [4, 5, 0, 1]
    assert torch.equal(r.input_ids, ids[rows, : P + 3])
    assert torch.equal(r.completion_mask, completion_mask[rows, :3])
    assert torch.equal(r.attention_mask[:, P:], r.completion_mask)
    assert r.truncated.tolist() == [True, False, False, True]
    assert r.pixel_values.flatten().tolist() == [3.0, 0.0] and r.tiles == [1, 1]
    assert r.texts == ["t4", "t5", "t0", "t1"] and r.answers == ["C", "C", "A", "A"]
    assert r.labels == {"answers": ["C", "C", "A", "A"]}
    assert r.rewards.tolist() == [4.0, 5.0, 0.0, 1.0]
    assert r.per_reward["dpa"].tolist() == pytest.approx([0.4, 0.5, 0.0, 0.1])


def test_rollout_layout_and_masks(compose_cfg):
    _, dm, module = build(compose_cfg, "model.max_patches=4")
    batch = uneven_prompts(dm)
    inputs = batch["inputs"]
    assert (inputs["attention_mask"][1] == 0).any()  # prompt 1 is left-padded
    torch.manual_seed(0)
    r = rollout(module, batch)
    P = inputs["input_ids"].shape[1]
    L = r.completion_mask.shape[1]
    assert r.size == 2 * G and r.input_ids.shape == (8, P + L) and L <= 6
    # rows [p0c0..p0c3, p1c0..p1c3]: each row starts with its prompt, with its image tiles
    for i in range(8):
        assert torch.equal(r.input_ids[i, :P], inputs["input_ids"][i // G])
        assert torch.equal(r.attention_mask[i, :P], inputs["attention_mask"][i // G])
    assert r.tiles == [3, 1]  # per prompt: pixel_values holds each prompt's tiles once
    tiles = inputs["pixel_values"].split([3, 1])
    for i in range(8):
        assert torch.equal(r.pixels_of([i]), tiles[i // G])
    assert r.answers == ["A"] * G + ["BC"] * G
    # completions: right-padded, the attention mask's tail, pad where masked, decoded texts
    mask = r.completion_mask
    assert torch.equal(r.attention_mask[:, P:], mask)
    assert (mask.sum(1) >= 1).all()
    assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
    completion = r.input_ids[:, P:]
    assert (completion[mask == 0] == module.tokenizer.pad_token_id).all()
    for i in range(8):
        text = module.tokenizer.decode(completion[i][mask[i].bool()], skip_special_tokens=True)
        assert text == r.texts[i]
    # rewards and advantages of these texts (eq. 2 per group of G)
    rewards, parts = score(r.texts, r.answers, module.reward_weights)
    assert torch.equal(r.rewards, rewards) and set(r.per_reward) == set(parts)
    assert torch.equal(r.advantages, group_advantages(rewards, G))
    # mu = 1: no stored old log-probs; the reference is the initial policy
    assert r.old_logprobs is None and r.ref_logprobs.shape == (8, L)
    with torch.no_grad():
        policy = module._logprobs(module.model, r, list(range(8)))
    m = mask.bool()
    torch.testing.assert_close(r.ref_logprobs[m], policy[m])
    assert (r.ref_logprobs[m] < 0).all()


def test_a_rank_without_zero_variance_groups_draws_in_step_and_keeps_its_rollout(
    compose_cfg, monkeypatch
):
    """Under FSDP every rank calls generate as often as the others: while another rank still
    redraws (a fake all-reduce says so twice), this rank samples too and keeps its rollout."""
    _, dm, module = build(compose_cfg, "module.resample_zero_variance=3")
    draws = []
    sample = module._sample

    def spy(inputs):
        draws.append(inputs["input_ids"].shape[0])
        return sample(inputs)

    other_rank = iter([True, True, False])  # the other rank's groups: flat, flat, then not
    monkeypatch.setattr(module, "_sample", spy)
    monkeypatch.setattr(module, "_any_rank", lambda flag: flag or next(other_rank))
    monkeypatch.setattr(  # every group of this rank has reward variance
        grpo_module, "score", lambda texts, answers, weights: (torch.arange(len(texts)) * 1.0, {})
    )
    batch = first_prompts(dm)
    torch.manual_seed(0)
    r = module.generate(batch)
    texts = list(r.texts)
    module.reward(r)
    assert draws == [2, 1, 1]  # the rollout, then two draws of one prompt, in step
    assert r.texts == texts and r.rewards.tolist() == list(range(2 * module.G))
    assert r.generated == 4 * module.G  # the discarded draws were sampled all the same


def test_rollout_never_samples_image_tokens(compose_cfg):
    _, dm, module = build(compose_cfg, "module.resample_zero_variance=2")
    banned = banned_token_ids(module.tokenizer)
    favour(module, banned)
    batch = first_prompts(dm)
    with torch.no_grad():
        last = module.model(**batch["inputs"]).logits[:, -1]  # (B, V)
    assert set(last.argmax(-1).tolist()) <= set(banned)  # unmasked, these would be sampled
    torch.manual_seed(0)
    r = rollout(module, batch)  # all groups score 0: the redraw path samples too
    assert r.zero_variance_sampled == 1.0
    assert not banned_in_completions(r, banned)
    assert r.completion_mask.sum() > 0


def test_resample_redraws_only_zero_variance_groups(compose_cfg, monkeypatch):
    _, dm, module = build(compose_cfg, "module.resample_zero_variance=3")
    draws = []
    sample = module._sample

    def spy(inputs):
        gen = sample(inputs)
        draws.append((inputs, (gen.completion_ids, gen.completion_mask, gen.texts, gen.truncated)))
        return gen

    rewards = iter([[0, 0, 0, 0, 0, 1, 0, 1], [1, 0, 0, 0]])  # group 0 flat, then not

    def fake_score(texts, answers, weights):
        total = torch.tensor(next(rewards), dtype=torch.float32)
        assert len(total) == len(texts)
        return total, {"fake": total.clone()}

    monkeypatch.setattr(module, "_sample", spy)
    monkeypatch.setattr(grpo_module, "score", fake_score)
    batch = first_prompts(dm)
    torch.manual_seed(0)
    r = rollout(module, batch)
    assert len(draws) == 2  # the redraw gave group 0 variance: no third draw
    redo_inputs, (redo_ids, redo_mask, redo_texts, redo_truncated) = draws[1]
    assert torch.equal(redo_inputs["input_ids"], batch["inputs"]["input_ids"][[0]])
    spec = module.model.config.image_token_id, module.model.config.image_seq_length
    tiles0 = tiles_per_row(batch["inputs"]["input_ids"], *spec)[0]
    assert torch.equal(redo_inputs["pixel_values"], batch["inputs"]["pixel_values"][:tiles0])
    first_ids, _, first_texts, first_truncated = draws[0][1]
    P, w = batch["inputs"]["input_ids"].shape[1], redo_ids.shape[1]
    assert r.texts == redo_texts + first_texts[G:]
    assert r.truncated.tolist() == redo_truncated.tolist() + first_truncated[G:].tolist()
    assert torch.equal(r.input_ids[:G, P : P + w], redo_ids)
    assert torch.equal(r.completion_mask[:G, :w], redo_mask)
    assert torch.equal(r.input_ids[G:, P : P + first_ids.shape[1]], first_ids[G:])
    assert r.rewards.tolist() == [1, 0, 0, 0, 0, 1, 0, 1]
    assert r.per_reward["fake"].tolist() == r.rewards.tolist()
    assert r.zero_variance_sampled == 0.5
    assert (r.advantages[:G] != 0).any()
    assert r.generated == 3 * G  # 2 prompts, then 1 again


# -- the update ------------------------------------------------------------------------------------
def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean"])
def test_minibatch_gradient_equals_full_batch(compose_cfg, monkeypatch, agg):
    _, dm, module = build(compose_cfg, f"module.loss_agg={agg}", "module.beta=0.04")
    module.model.double()
    module.ref_model.double()
    with torch.no_grad():  # policy != reference, so the KL term has a gradient too
        module.model.lm_head.weight.add_(0.05 * torch.randn_like(module.model.lm_head.weight))
    backward_without_trainer(module)
    torch.manual_seed(0)
    r = rollout(module, first_prompts(dm))
    vary_lengths(r, [1, 6, 2, 5, 3, 6, 4, 1])  # unequal lengths tell the two weightings apart
    r.advantages = torch.randn(8, dtype=torch.float64)  # a signal, whatever the rewards

    def accumulated(size):
        module.model.zero_grad(set_to_none=True)
        module.mini_batch_size = size
        stats = module.accumulate_gradients(r)
        return stats, grads(module)

    full_stats, full = accumulated(None)
    mini_stats, mini = accumulated(3)  # mini-batches of 3, 3 and 2 completions
    assert full and any(g.abs().max() > 0 for g in full.values())
    for name, g in full.items():
        torch.testing.assert_close(mini[name], g, rtol=1e-9, atol=1e-12)
    for key in ("loss", "kl", "clip_frac", "ratio_mean"):
        assert mini_stats[key] == pytest.approx(full_stats[key], rel=1e-9, abs=1e-12)

    # the other aggregation's weights would give another gradient: the check can fail
    other = "token_mean" if agg == "sequence_mean" else "sequence_mean"
    monkeypatch.setattr(
        grpo_module, "loss_share", lambda mask, n, tokens, _agg: loss_share(mask, n, tokens, other)
    )
    _, wrong = accumulated(3)
    assert not all(torch.allclose(wrong[n], g, rtol=1e-6) for n, g in full.items())


def test_mu_above_one_uses_the_rollout_policy_logprobs(compose_cfg, monkeypatch):
    _, dm, module = build(compose_cfg, "module.num_iterations=2", "module.beta=0.0")
    backward_without_trainer(module)
    seen = []
    loss_fn = grpo_module.policy_loss

    def spy(logprobs, old, *args, **kwargs):
        seen.append((logprobs.detach().clone(), old))
        return loss_fn(logprobs, old, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "policy_loss", spy)
    torch.manual_seed(0)
    r = rollout(module, first_prompts(dm))
    assert r.old_logprobs is not None and r.ref_logprobs is None
    r.advantages = torch.randn(8)
    opt = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    first = module.accumulate_gradients(r)
    opt.step()
    opt.zero_grad()
    second = module.accumulate_gradients(r)
    m = r.completion_mask.bool()
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # same weights as the rollout
    assert abs(second["ratio_mean"] - 1.0) > 1e-3  # pi_theta moved away from pi_old
    assert torch.equal(seen[0][1], r.old_logprobs) and torch.equal(seen[1][1], r.old_logprobs)
    assert (seen[1][0][m] - r.old_logprobs[m]).abs().max() > 1e-3
    assert "kl" not in second


def test_reference_model_only_with_beta(compose_cfg):
    _, dm, module = build(compose_cfg, "module.beta=0.0")
    assert module.ref_model is None
    torch.manual_seed(0)
    assert rollout(module, first_prompts(dm)).ref_logprobs is None
    _, _, with_kl = build(compose_cfg, "module.beta=0.04")
    ref = with_kl.ref_model
    assert ref is not None and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())


# -- through a Trainer -----------------------------------------------------------------------------
class Recorder(Logger):
    """A logger that keeps what it is given, W&B's log_table included."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict[str, float]] = []
        self.tables: list[dict] = []

    name, version = "recorder", "0"

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_table(self, key, columns, data):
        self.tables.append({"key": key, "columns": columns, "data": data})


def fit(cfg, dm, module, steps: int, logger=False, ckpt_path=None):
    trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


LOGGED = {
    "train/loss",
    "train/reward/total",
    "train/reward/total_std",
    "train/reward/format",
    "train/reward/format_std",
    "train/reward/dpa",
    "train/reward/dpa_std",
    "train/reward/letter_e",
    "train/advantage_std",
    "train/zero_variance_groups",
    "train/zero_variance_groups_sampled",
    "train/kl",
    "train/clip_frac",
    "train/completion_length/mean",
    "train/completion_length/max",
    "train/completion_length/truncated_frac",
    "train/lr",
    "train/time/rollout",
    "train/time/update",
    "train/rollouts",
    "train/rollouts_total",
}


@pytest.mark.slow
def test_fit_logs_every_step_and_checkpoints_without_reference(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "letter_e", letter_e)
    overrides = [
        "+module.rewards.letter_e=1.0",
        "module.mini_batch_size=3",
        "module.resample_zero_variance=1",
        "module.log_completions_every_n_steps=1",
        "module.optimizer.lr=1.0e-3",
    ]
    cfg, dm, module = build(compose_cfg, *overrides)
    recorder = Recorder()
    trainer = fit(cfg, dm, module, steps=2, logger=recorder)
    steps = [m for m in recorder.metrics if "train/loss" in m]
    assert len(steps) == 2
    for m in steps:
        assert set(m) >= LOGGED, LOGGED - set(m)
        assert 0 <= m["train/zero_variance_groups"] <= m["train/zero_variance_groups_sampled"]
        assert 1 <= m["train/completion_length/max"] <= 6
        assert m["train/kl"] >= 0 and m["train/time/rollout"] > 0
        assert m["train/rollouts"] >= 2 * G  # 2 prompts, and any redraw
    assert steps[1]["train/rollouts_total"] == sum(m["train/rollouts"] for m in steps)
    assert steps[0]["train/lr"] == pytest.approx(1e-3)  # no warmup: the configured LR
    assert [t["key"] for t in recorder.tables] == ["train/completions"] * 2
    table = recorder.tables[0]
    assert table["columns"][:5] == ["step", "prompt", "answer", "completion", "reward"]
    assert [row[1] for row in table["data"]] == [0] * G + [1] * G  # 2 prompts x G

    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert not [k for k in state if k.startswith("ref_model.")]
    assert any(k.startswith("model.") for k in state)
    trained = {k: v.clone() for k, v in module.model.state_dict().items()}

    # resume: the policy comes from the checkpoint, the reference from the initial model again
    cfg, dm, resumed = build(compose_cfg, *overrides)
    initial = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    loaded = []
    resumed.on_train_start = lambda: loaded.append(
        {k: v.clone() for k, v in resumed.model.state_dict().items()}
    )
    resumed_log = Recorder()
    fit(cfg, dm, resumed, steps=3, logger=resumed_log, ckpt_path=str(ckpt))
    assert all(torch.equal(loaded[0][k], v) for k, v in trained.items())
    (third,) = [m for m in resumed_log.metrics if "train/loss" in m]  # the count goes on
    total = steps[1]["train/rollouts_total"] + third["train/rollouts"]
    assert third["train/rollouts_total"] == total
    assert not all(torch.equal(initial[k], v) for k, v in trained.items())
    ref = resumed.ref_model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in initial.items())

    # loading stays strict for the policy: a missing policy weight is an error
    broken = torch.load(ckpt, weights_only=False)
    del broken["state_dict"][next(k for k in broken["state_dict"] if k.startswith("model."))]
    torch.save(broken, tmp_path / "broken.ckpt")
    cfg, dm, again = build(compose_cfg, *overrides)
    with pytest.raises(RuntimeError, match="Missing key"):
        fit(cfg, dm, again, steps=3, ckpt_path=str(tmp_path / "broken.ckpt"))


def test_fast_paths_keep_the_plain_modules_numbers(compose_cfg):
    """Shared image encoding, a static cache and a padded vocabulary, wired through the module:
    the same completions (greedy-equivalent top_k=1 sampling) and the same log-probs."""
    sampling = ["module.sampling.top_k=1", "model.max_patches=4"]
    _, dm, plain = build(compose_cfg, *sampling)
    _, _, fast = build(
        compose_cfg,
        *sampling,
        "module.fast.share_images=true",
        "module.fast.cache=static",
        "module.fast.max_cache_len=512",
        "model.pad_vocab_to_multiple_of=128",
    )
    assert fast.model.lm_head.weight.shape[0] % 128 == 0  # the padded head is really in use
    batch = uneven_prompts(dm)  # 3 tiles and 1 tile: the shared encoding must map groups right
    torch.manual_seed(0)
    r_plain = rollout(plain, batch)
    torch.manual_seed(0)
    r_fast = rollout(fast, batch)
    assert torch.equal(r_plain.input_ids, r_fast.input_ids)
    assert r_plain.texts == r_fast.texts
    rows = [1, 2, 5, 7]  # a mini-batch that splits both groups
    mask = r_plain.completion_mask[rows].bool()
    for a, b in ((plain.model, fast.model), (plain.ref_model, fast.ref_model)):
        want = plain._logprobs(a, r_plain, rows)
        got = fast._logprobs(b, r_fast, rows)
        assert torch.allclose(got[mask], want[mask], atol=1e-5), (got - want).abs().max()


def test_mask_truncated_completions_leaves_cut_completions_out_of_the_loss(compose_cfg):
    # beta 0: a completion with advantage 0 and ratio 1 adds nothing to eq. 3's gradient, so
    # masking the cut completions must train exactly as zeroing their advantages does
    overrides = ("module.beta=0", "module.sampling.max_new_tokens=3")
    _, dm, module = build(compose_cfg, "module.mask_truncated_completions=true", *overrides)
    module.model.double()
    backward_without_trainer(module)
    torch.manual_seed(0)
    r = rollout(module, first_prompts(dm))
    cut = r.truncated
    assert cut.any()
    lengths = r.completion_mask.sum(1)
    last = r.input_ids[:, -r.completion_mask.shape[1] :].gather(1, (lengths - 1)[:, None])[:, 0]
    assert torch.equal(cut, (lengths == 3) & (last != module.tokenizer.eos_token_id))
    assert r.loss_mask[cut].sum() == 0
    assert torch.equal(r.loss_mask[~cut], r.completion_mask[~cut])
    r.advantages = torch.linspace(-1, 1, r.size, dtype=torch.float64)  # a signal on every row

    def gradient(rollout):
        module.model.zero_grad(set_to_none=True)
        module.accumulate_gradients(rollout)
        grads = [p.grad.flatten() for p in module.model.parameters() if p.grad is not None]
        return torch.cat(grads)

    masked = gradient(r)
    unmasked = replace(r, mask_truncated=False)
    zeroed = replace(unmasked, advantages=torch.where(cut, 0.0, r.advantages))
    torch.testing.assert_close(masked, gradient(zeroed), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(masked, gradient(unmasked))


# -- the difficulty band ---------------------------------------------------------------------------
BAND = "module.difficulty_band={low:0.25,high:0.75,oversample:2}"  # 4 prompts drawn, up to 2 kept
VERDICTS = {  # per completion: right; right by the metric only (a subset, DPA 0.5); wrong
    1: {"correct": True, "dpa": 1.0},
    0.5: {"correct": True, "dpa": 0.5},
    0: {"correct": False, "dpa": 0.0},
}


def fake_judge(*patterns: list[float]):
    """A metric judge that rules by `patterns` (one per call, each per completion) and checks it
    is handed every completion with its labels."""
    calls = iter(patterns)

    def judge(completions, answers, dimensions=None, **_):
        pattern = next(calls)
        assert len(completions) == len(answers) == len(pattern)
        return [dict(VERDICTS[p]) for p in pattern]

    return judge


@pytest.mark.parametrize(("correct", "kept"), [("metric", [1, 2]), ("exact", [1, 3])])
def test_difficulty_band_keeps_the_first_groups_in_band(compose_cfg, monkeypatch, correct, kept):
    """Pass rates by mining's rule: metric [1, 0.5, 0.75, 0.25], exact [1, 0.5, 0, 0.25]; the
    band [0.25, 0.75] keeps the first 2 in band, in draw order, and nothing else of them."""
    _, dm, module = build(compose_cfg, BAND, f"module.mining.correct={correct}")
    pattern = [*(1, 1, 1, 1), *(1, 1, 0, 0), *(0.5, 0.5, 0.5, 0), *(1, 0, 0, 0)]  # 4 groups
    monkeypatch.setattr(module.val_score, "judge", fake_judge(pattern))
    batch = first_prompts(dm, 4)
    torch.manual_seed(0)
    drawn = module.generate(batch)
    before = replace(drawn, texts=list(drawn.texts), truncated=drawn.truncated.clone())
    module.reward(drawn)
    r, rows = drawn, [p * G + g for p in kept for g in range(G)]
    assert r.size == 2 * G and r.tiles == [before.tiles[p] for p in kept]
    assert r.texts == [before.texts[i] for i in rows]
    assert r.answers == [batch["answers"][p] for p in kept for _ in range(G)]
    assert r.labels["dimensions"] == [batch["dimensions"][p] for p in kept for _ in range(G)]
    P, width = batch["inputs"]["input_ids"].shape[1], r.input_ids.shape[1]
    assert torch.equal(r.input_ids, before.input_ids[rows, :width])
    assert not before.completion_mask[rows, width - P :].any()  # only padding cut off
    assert torch.equal(r.completion_mask, r.attention_mask[:, -r.completion_mask.shape[1] :])
    assert torch.equal(r.truncated, before.truncated[rows])
    per_prompt = before.pixel_values.split(before.tiles)
    assert torch.equal(r.pixel_values, torch.cat([per_prompt[p] for p in kept]))
    rewards, parts = score(r.texts, r.answers, module.reward_weights)
    assert torch.equal(r.rewards, rewards) and torch.equal(r.per_reward["dpa"], parts["dpa"])
    assert r.generated == 4 * G  # the filtered groups were sampled too
    assert r.band_kept == 0.5 and r.loss_weight == 1.0


def test_difficulty_band_with_none_in_band_keeps_a_weightless_group(compose_cfg, monkeypatch):
    _, dm, module = build(compose_cfg, BAND)
    monkeypatch.setattr(module.val_score, "judge", fake_judge([0] * 4 * G))  # pass rates 0
    torch.manual_seed(0)
    r = module.generate(first_prompts(dm, 4))
    texts = list(r.texts)
    module.reward(r)
    assert r.texts == texts[:G] and r.loss_weight == 0.0
    assert r.band_kept == 0.0 and r.generated == 4 * G


def test_difficulty_band_step_trains_on_kept_groups_and_counts_every_rollout(
    compose_cfg, monkeypatch
):
    """Through a Trainer: the loader draws oversample x batch_size prompts, the update sees the
    kept groups only, every completion sampled is counted; with none in band the step leaves
    the weights (and AdamW's moments) alone while the step counter advances."""
    monkeypatch.setitem(REWARDS, "letter_e", letter_e)  # reward variance: a gradient to take
    overrides = [
        "module.difficulty_band={low:0.5,high:1.0,oversample:2}",
        "+module.rewards.letter_e=1.0",
        "module.optimizer.lr=1.0e-3",
    ]
    # each step's 4 prompts: only the second has answers right (pass rate 1), the rest 0
    pattern = [0] * G + [1] * G + [0] * 2 * G
    monkeypatch.setattr(ScreeningScore, "judge", staticmethod(fake_judge(pattern, pattern)))
    cfg, dm, module = build(compose_cfg, *overrides)
    assert dm.train_batch_size == 4 and dm.batches_per_epoch(2) == [6, 6]  # 24 samples, 4 a step
    sizes = []
    update = module.update
    monkeypatch.setattr(module, "update", lambda r: sizes.append(r.size) or update(r))
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    recorder = Recorder()
    trainer = fit(cfg, dm, module, steps=2, logger=recorder)
    steps = [m for m in recorder.metrics if "train/loss" in m]
    assert sizes == [G, G]  # one group of four trained on, each step
    assert [m["train/rollouts"] for m in steps] == [4 * G, 4 * G]
    assert [m["train/rollouts_total"] for m in steps] == [4 * G, 8 * G]
    assert [m["train/band_kept"] for m in steps] == [0.25, 0.25]
    moved = module.model.state_dict()
    assert not all(torch.equal(initial[k], v) for k, v in moved.items())
    assert module.step_log.state_dict() == {"rollouts_total": 8 * G}  # what checkpoints keep

    # nothing in band on any rank: two steps that train nothing, counted all the same
    monkeypatch.setattr(ScreeningScore, "judge", staticmethod(fake_judge(*[[0] * 4 * G] * 2)))
    cfg, dm, module = build(compose_cfg, *overrides)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    recorder = Recorder()
    trainer = fit(cfg, dm, module, steps=2, logger=recorder)
    steps = [m for m in recorder.metrics if "train/loss" in m]
    assert trainer.global_step == 2 and [m["train/loss"] for m in steps] == [0.0, 0.0]
    assert [m["train/rollouts_total"] for m in steps] == [4 * G, 8 * G]
    assert [m["train/band_kept"] for m in steps] == [0.0, 0.0]
    assert all(torch.equal(initial[k], v) for k, v in module.model.state_dict().items())
    assert not trainer.optimizers[0].state  # AdamW never took a step: no moments
