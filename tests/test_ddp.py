"""The same LightningModule under Lightning's DDP (2 CPU processes, gloo) through train.py.

SFT is deterministic, so a 2-process run must train the weights a 1-process run trains on the
same global batches. DDP averages the ranks' gradients, each the mean over its own batch; the
1-process run that does the same is batch 1 with 2 accumulated micro-batches (a doubled batch
would instead average over the tokens of both samples at once: another loss when the samples'
target lengths differ). Both runs use DDP's distributed sampler, so step k's global batch is the
same two samples. GRPO samples, so its runs are checked for what DDP must give them: each rank
its own prompts (the hard-case sampler's shards) and its own sampling noise, the same weights on
both ranks after the steps, and the same weights whether a rank's completions go through one
backward or through mini-batches whose gradients are all-reduced once, at the last. With the
difficulty band, a rank that keeps no group still steps with the other, which trains, and the
rollout count sums both ranks.
FSDP needs a GPU in Lightning: its config is checked to compose and build its strategy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import toy_reward_site
from hydra.utils import instantiate
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

RECORDER = textwrap.dedent(
    """
    import hashlib, json
    import lightning as L
    import torch

    class Record(L.Callback):
        '''Per rank: each batch's sample ids and torch RNG state, then the trained weights.'''

        def __init__(self, path):
            self.path = path

        def _write(self, trainer, row):
            with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
                f.write(json.dumps(row) + "\\n")

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
            row = {"step": trainer.global_step, "ids": list(batch["ids"]), "rng": rng}
            self._write(trainer, row)

        def on_train_end(self, trainer, module):
            blob = b"".join(p.detach().cpu().numpy().tobytes() for p in module.model.parameters())
            digest = hashlib.sha256(blob).hexdigest()
            self._write(trainer, {"weights": digest, "world_size": trainer.world_size})
    """
)


# The random tiny model earns no screening reward: GRPO with all advantages 0 and the policy
# equal to the reference has no gradient to all-reduce. This toy reward varies.
TOY_REWARD = ["~module.rewards", "+module.rewards={letter_e:1.0}"]


def train_cli(tmp_path: Path, name: str, *overrides: str) -> Path:
    """Run train.py in a subprocess (Lightning re-launches it per rank); returns its run dir."""
    run = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=0",
        "trainer.max_epochs=1",
        "+callbacks.record._target_=hcm_record.Record",
        f"+callbacks.record.path={run}/record",
        f"hydra.run.dir={run}",
        *overrides,
    ]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run


def records(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"record.rank{rank}").read_text().splitlines()]


@pytest.fixture
def recorder(tmp_path, compose_cfg):
    (tmp_path / "hcm_record.py").write_text(RECORDER)
    # Built here, not by the ranks: transformers' save_pretrained writes no weights on a rank > 0
    # once torch.distributed is up, and that rank may win ensure_tiny_model's rename.
    from hcm.model.loading import resolve_name_or_path

    model = compose_cfg("train", ["experiment=tiny_sft"]).model
    resolve_name_or_path(model.name_or_path, model.tiny)


@pytest.mark.slow
def test_ddp_sft_equals_one_process_on_the_same_global_batches(tmp_path, hcm_root, recorder):
    sft = ["experiment=tiny_sft", "data.batch_size=1", "callbacks.progress_bar=null"]
    two = train_cli(tmp_path, "ddp2", *sft, "trainer.devices=2", "+trainer.limit_train_batches=3")
    one = train_cli(
        tmp_path, "ddp1", *sft, "trainer.devices=1", "+trainer.limit_train_batches=6",
        "+trainer.accumulate_grad_batches=2",
    )  # fmt: skip

    # step k's global batch: rank 0's and rank 1's sample = the two accumulated micro-batches
    ranks = [[r["ids"] for r in records(two, k) if "ids" in r] for k in (0, 1)]
    micro = [r["ids"] for r in records(one, 0) if "ids" in r]
    assert len(ranks[0]) == len(ranks[1]) == 3 and len(micro) == 6
    for step in range(3):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(
            micro[2 * step] + micro[2 * step + 1]
        )
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}  # disjoint

    ddp = load_file(two / "model" / "model.safetensors")
    single = load_file(one / "model" / "model.safetensors")
    init = load_file(Path(hcm_root) / ".cache" / "tiny-internvl3" / "model.safetensors")
    key = next(k for k in single if k.endswith("layers.0.mlp.up_proj.weight"))
    moved = (single[key] - init[key]).abs().max()
    assert moved > 1e-3  # training changed the weights ...
    for name, value in single.items():  # ... and both runs changed them alike
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5, msg=name)
    hashes = {records(two, k)[-1]["weights"] for k in (0, 1)}
    assert len(hashes) == 1 and records(two, 0)[-1]["world_size"] == 2


@pytest.mark.slow
def test_ddp_grpo_shards_prompts_and_keeps_ranks_in_sync(tmp_path, hcm_root, recorder):
    grpo = [
        "experiment=tiny_grpo", "trainer.devices=2", "data.batch_size=1", "data.switch_epoch=1",
        "trainer.limit_train_batches=2", "callbacks.progress_bar=null", *TOY_REWARD,
    ]  # fmt: skip
    (tmp_path / "sitecustomize.py").write_text(toy_reward_site())  # tmp_path: on PYTHONPATH
    # 4 completions per rank in mini-batches of 2: the first backward skips DDP's all-reduce
    run = train_cli(tmp_path, "grpo", *grpo, "module.mini_batch_size=2")
    whole = train_cli(tmp_path, "whole", *grpo)  # one all-reduced backward
    for r in (run, whole):
        seen = [[i for b in records(r, k) if "ids" in b for i in b["ids"]] for k in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 2
        assert not set(seen[0]) & set(seen[1])  # each rank its own prompts
        firsts = [records(r, k)[0]["rng"] for k in (0, 1)]
        assert firsts[0] != firsts[1]  # each rank samples with its own noise
        finals = [records(r, k)[-1] for k in (0, 1)]
        assert finals[0]["world_size"] == 2
        assert finals[0]["weights"] == finals[1]["weights"]  # gradients were all-reduced
        assert json.loads((r / "stage.json").read_text())["kind"] == "grpo"
    # the same rollouts (same seeds), so the accumulated-then-reduced gradient must train the
    # weights the single all-reduced backward trains
    assert [b["ids"] for b in records(run, 0) if "ids" in b] == [
        b["ids"] for b in records(whole, 0) if "ids" in b
    ]
    mini = load_file(run / "model" / "model.safetensors")
    full = load_file(whole / "model" / "model.safetensors")
    init = load_file(Path(hcm_root) / ".cache" / "tiny-internvl3" / "model.safetensors")
    key = next(k for k in full if k.endswith("layers.0.mlp.up_proj.weight"))
    assert (full[key] - init[key]).abs().max() > 1e-5  # the steps moved the weights
    # AdamW's first steps move each weight by about lr * sign(g) (lr 1e-4 here), so float-level
    # differences between summing mini-batches and one backward flip a few near-zero gradients
    # (seen: 4e-6, the same without no_sync); a gradient missing a mini-batch or a rank moves
    # many weights by up to 2 * lr.
    for name, value in full.items():
        torch.testing.assert_close(mini[name], value, rtol=0, atol=1e-5, msg=name)


# Rank 1's answers all right, rank 0's all wrong: with the band [0.5, 1], rank 1 keeps its groups
# and rank 0 none (it joins the backward with a weightless group).
SPLIT_JUDGE = textwrap.dedent(
    """
    import torch.distributed as dist
    from hcm.screening_score import ScreeningScore

    def judge(self, completions, answers, dimensions=None):
        right = dist.is_initialized() and dist.get_rank() == 1
        return [{"correct": right, "dpa": float(right)} for _ in completions]

    ScreeningScore.judge = judge
    """
)


@pytest.mark.slow
def test_ddp_difficulty_band_with_one_rank_empty_keeps_ranks_in_step(tmp_path, hcm_root, recorder):
    band = [
        "experiment=tiny_grpo", "trainer.devices=2", "data.batch_size=1", "data.switch_epoch=1",
        "trainer.limit_train_batches=2", "callbacks.progress_bar=null", *TOY_REWARD,
        "module.difficulty_band={low:0.5,high:1.0,oversample:2}",
    ]  # fmt: skip
    (tmp_path / "sitecustomize.py").write_text(toy_reward_site() + SPLIT_JUDGE)
    run = train_cli(tmp_path, "band", *band)
    seen = [[i for b in records(run, k) if "ids" in b for i in b["ids"]] for k in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4  # 2 steps x 2 prompts drawn per rank
    finals = [records(run, k)[-1] for k in (0, 1)]
    assert finals[0]["weights"] == finals[1]["weights"]  # one all-reduce per step, both ranks
    trained = load_file(run / "model" / "model.safetensors")
    init = load_file(Path(hcm_root) / ".cache" / "tiny-internvl3" / "model.safetensors")
    key = next(k for k in trained if k.endswith("layers.0.mlp.up_proj.weight"))
    assert (trained[key] - init[key]).abs().max() > 1e-5  # rank 1's groups trained
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]
    steps = [r for r in rows if r.get("train/rollouts")]
    assert [float(r["train/rollouts"]) for r in steps] == [16.0, 16.0]  # 2 ranks x 2 x G=4
    assert [float(r["train/rollouts_total"]) for r in steps] == [16.0, 32.0]
    assert [float(r["train/band_kept"]) for r in steps] == [0.0, 0.0]  # rank 0's: none


def test_fsdp_config_composes_and_builds_its_strategy(compose_cfg):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    cfg = compose_cfg("train", ["experiment=tiny_grpo", "trainer=fsdp", "trainer.devices=8"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 8
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {InternVLVisionLayer, Qwen2DecoderLayer} <= set(policy._module_classes)
    ddp = compose_cfg("train", ["experiment=tiny_sft", "trainer=ddp"])
    assert isinstance(instantiate(ddp.trainer.strategy), DDPStrategy)
    assert ddp.trainer.precision == "auto"


def run_cli(tmp_path: Path, script: str, name: str, *overrides: str) -> Path:
    """Run train.py or eval.py in a subprocess with quiet CPU settings; returns its run dir."""
    run = tmp_path / name
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(REPO / script), f"hydra.run.dir={run}", *overrides]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run


def scores(metrics: dict, prefix: str) -> dict[str, float]:
    """The scoring keys of a metrics dict, without their val/ or test/ prefix."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


@pytest.mark.slow
def test_ddp_evaluation_scores_each_sample_once(tmp_path, hcm_root, recorder):
    # 5 questions on 2 ranks: one rank's shard is padded with a repeat, which must not count.
    # Batches of 1 make each answer independent of its batch-mates (no padding differences).
    quick = [
        "data.limit_eval=5", "data.eval_batch_size=1", "max_completion_length=4",
        "model.max_patches=1", "prompt.user='Original <image> Generated <image> Answer:'",
        "logger=csv",
    ]  # fmt: skip
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    one = run_cli(tmp_path, "eval.py", "eval1", "experiment=tiny_eval", *quick)
    two = run_cli(tmp_path, "eval.py", "eval2", "experiment=tiny_eval", *quick, *ddp)
    expected = scores(json.loads((one / "metrics.json").read_text())["metrics"], "test")
    assert expected["score/count"] == 5
    assert "completion_length/truncated_frac" in expected
    assert scores(json.loads((two / "metrics.json").read_text())["metrics"], "test") == expected

    # validation of an SFT and a GRPO stage under DDP, at lr 0: the model eval.py scored
    fit = [
        "module.optimizer.lr=0.0", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "callbacks.progress_bar=null", *quick, *ddp,
    ]  # fmt: skip
    stages = {
        "sft": ["experiment=tiny_sft", "data.batch_size=1"],
        "grpo": ["experiment=tiny_grpo", "data.composition=all", "module.beta=0"],
    }
    for name, stage in stages.items():
        run = run_cli(tmp_path, "train.py", name, *stage, *fit)
        metrics = json.loads((run / "stage.json").read_text())["metrics"]
        assert scores(metrics, "val") == pytest.approx(expected), name


@pytest.mark.slow
def test_ddp_ranks_wait_for_rank_zero_to_hold_the_stage_lock(tmp_path, hcm_root, recorder):
    """Rank 1 enters a pipeline's second stage while rank 0 still waits for that stage's lock,
    held here by another job whose checkpoint write is under way: rank 1 must leave the stage's
    folder alone until rank 0 holds the lock, and both must then run the stage."""
    import time

    from hcm.files import folder_lock

    run = tmp_path / "locked"
    second = run / "stages" / "sft_1_2"
    in_flight = second / "checkpoints" / ".last.ckpt.tmp-1"  # another job's write, under way
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"half a checkpoint")
    args = [
        sys.executable, str(REPO / "train.py"), "experiment=tiny_hcm", "pipeline.grpo=null",
        "pipeline.eval=null", "paths.stage_store=null", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
        "trainer.limit_val_batches=0", "data.batch_size=1", "callbacks.progress_bar=null",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with folder_lock(second, "the test"):
        job = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            first = run / "stages" / "sft_1_1" / "stage.json"
            deadline = time.monotonic() + 600
            while not first.is_file() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert first.is_file(), job.communicate()[0][-4000:] if job.poll() is not None else ""
            time.sleep(10)  # rank 1 reaches the second stage at once; rank 0 waits for the lock
            assert in_flight.is_file()  # not removed as if a crash had left it
            assert job.poll() is None
        except BaseException:
            os.killpg(job.pid, signal.SIGKILL)  # both ranks
            raise
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-4000:]
    done = json.loads((second / "stage.json").read_text())
    assert done["kind"] == "sft" and done["metrics"]
    assert not in_flight.exists()  # the lock's holder, rank 0, then cleared the dead write
