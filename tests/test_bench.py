"""The GRPO-step benchmark: its clock, FLOP count, workload and config, and a tiny CPU run of both
sides (ours and TRL) that prints the table. No timing is asserted on CPU."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hcm.bench import timing
from hcm.bench.flops import forward_flops, text_flops_per_sequence, update_mfu
from hcm.bench.run import peak_flops
from hcm.bench.timing import PhaseClock, summarize
from hcm.bench.workload import conversations, prompt_text, widen_tokenizer_file
from hcm.model.tiny import TinySizes, build_tiny_model, build_tiny_tokenizer


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_phase_clock_charges_exclusive_time_to_nested_phases(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = PhaseClock()
    clock.enter("optimizer")  # outside a step: not charged
    fake.now += 5
    clock.exit("optimizer")
    for reference in (2.0, 4.0):
        clock.begin_step()
        fake.now += 1  # step overhead
        clock.enter("rollout")
        fake.now += 3
        clock.enter("reference")  # inside the rollout
        fake.now += reference
        clock.exit("reference")
        clock.exit("rollout")
        update = clock.wrap(lambda x: fake.__setattr__("now", fake.now + x), "update")
        update(0.5)
        update(0.25)  # two calls of one phase add up
        clock.count(completion_tokens=10 * reference)
        clock.end_step()
    first = clock.steps[0]
    assert first["time"] == {"step": 1, "rollout": 3, "reference": 2, "update": 0.75}
    assert "optimizer" not in first["time"]
    summary = summarize(clock.steps, warmup=0)
    assert summary["time"]["reference"] == 3.0  # median of 2 and 4
    assert summary["step_time"] == pytest.approx(1 + 3 + 3 + 0.75)
    assert summary["counts"]["completion_tokens"] == 30
    assert summarize(clock.steps, warmup=1)["time"]["reference"] == 4.0
    with pytest.raises(ValueError, match="warm-up"):
        summarize(clock.steps, warmup=2)
    with pytest.raises(RuntimeError, match="left"):
        clock.begin_step()
        clock.enter("a")
        clock.exit("b")


def test_decoder_flops_are_twice_the_linear_weights_per_token():
    sizes = TinySizes(text_hidden_size=64, text_intermediate_size=96)
    model = build_tiny_model(sizes)
    config = model.config
    layers = model.model.language_model.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    decoder, head = text_flops_per_sequence(config, seq_len=1, logit_positions=1)
    scores = 2 * config.text_config.hidden_size * config.text_config.num_hidden_layers  # S=1
    assert decoder - scores == 2 * linear
    assert head == 2 * model.lm_head.weight.numel()
    one = forward_flops(config, 1, seq_len=10, tiles_per_sequence=1, logit_positions=4)
    two = forward_flops(config, 2, seq_len=10, tiles_per_sequence=1, logit_positions=4)
    assert two.total == pytest.approx(2 * one.total) and one.vision > 0 and one.projector > 0
    assert update_mfu(one, 1.0, None) is None
    assert update_mfu(one, 2.0, one.total) == pytest.approx(1.5)  # 3 x forward / 2 s


def test_internvl3_2b_forward_flops_are_in_the_known_range():
    from hcm.model.tiny import tiny_config

    class Tok:
        eos_token_id, pad_token_id, context_image_token_id = 2, 0, 5

        def __len__(self):
            return 151674

    sizes = TinySizes(
        vision_hidden_size=1024, vision_num_hidden_layers=24, vision_num_attention_heads=16,
        vision_intermediate_size=4096, image_size=448, text_hidden_size=1536,
        text_num_hidden_layers=28, text_num_attention_heads=12, text_num_key_value_heads=2,
        text_intermediate_size=8960,
    )  # fmt: skip
    flops = forward_flops(tiny_config(Tok(), sizes), 32, 1018, 2, 256)
    # ~1.3e9 decoder weights x 2 x 32.6k tokens; InternViT-300M on 64 tiles of 1025 tokens
    assert 8.0e13 < flops.text < 1.0e14
    assert 4.0e13 < flops.vision < 5.0e13
    assert 0.3 < (flops.vision + flops.projector) / flops.total < 0.4  # "a third" (perf anchors)


def test_peak_flops_by_device_name():
    table = {"H100": 989.4, "A100": 312}
    assert peak_flops(table, "NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops(table, "cpu") is None


def test_widened_tokenizer_keeps_encoding_and_decodes_every_id(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path)
    before = AutoTokenizer.from_pretrained(tmp_path)
    text = "<think>I observed <A> the shadow</think><answer>A</answer>"
    assert widen_tokenizer_file(tmp_path, 2000) == 2000 - len(before)
    after = AutoTokenizer.from_pretrained(tmp_path)
    assert len(after) == 2000
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert after.decode([1999]).startswith(" w") and after.decode([len(before)]) == " w0"
    assert after.eos_token_id == before.eos_token_id
    with pytest.raises(ValueError, match="below"):
        widen_tokenizer_file(tmp_path, 10)


def test_workload_prompts():
    tok = build_tiny_tokenizer()
    text = prompt_text(tok, "Which candidate keeps the product unchanged? ", 40)
    assert abs(len(tok(text)["input_ids"]) - 40) <= 2
    prompts = conversations(tok, "Pick one. ", 3, 2, 56, 20, seed=0)
    assert len(prompts) == 3 and all(len(p["images"]) == 2 for p in prompts)
    assert prompts[0]["images"][0].size == (56, 56)
    assert prompts[0]["images"][0].tobytes() != prompts[1]["images"][0].tobytes()


def test_bench_config_is_the_papers_step(compose_cfg):
    from hcm.bench.trl_grpo import trl_args

    cfg = compose_cfg("bench", [])
    m = cfg.module
    assert cfg.workload.prompts * m.group_size == 32 and m.group_size == 4
    assert (m.beta, m.sampling.top_k, m.sampling.top_p, m.sampling.temperature) == (
        0.04, 3, 0.8, 1.0
    )  # fmt: skip
    assert m.sampling.max_new_tokens == 256 and cfg.workload.images_per_prompt == 2
    assert cfg.architectures[cfg.arch].vocab_size == 151674
    args = trl_args(cfg, steps=4)
    assert args["loss_type"] == "grpo" and args["beta"] == 0.04 and args["top_k"] == 3
    assert args["per_device_train_batch_size"] == 32 and args["num_generations"] == 4
    assert args["gradient_checkpointing"] is True and args["max_steps"] == 4
    assert cfg.model.gradient_checkpointing is True
    one_b = compose_cfg("bench", ["arch=internvl3_1b", "model=internvl3_1b"])
    assert one_b.architectures[one_b.arch].sizes.text_hidden_size == 896


@pytest.mark.slow
def test_tiny_bench_runs_both_sides_and_prints_the_table(compose_cfg, capsys):
    from hcm.bench.run import run_bench

    cfg = compose_cfg(
        "bench",
        [
            "arch=tiny",
            "workload.prompts=2",
            "workload.text_tokens=16",
            "module.sampling.max_new_tokens=6",
            "warmup=1",
            "repeats=1",
        ],
    )
    results = run_bench(cfg)
    printed = capsys.readouterr().out
    assert "| phase | ours s | TRL s | ours/TRL time |" in printed
    for row in ("| rollout |", "| reference |", "| update |", "| optimizer |", "| whole step |"):
        assert row in printed
    assert "transformers 5." in printed and "trl 1." in printed
    saved = json.loads(Path(cfg.output_file).read_text())
    assert saved["table"] == results["table"]
    ours, trl = saved["sides"]["ours"], saved["sides"]["trl"]
    for side in (ours, trl):
        assert side["steps"] == 1
        assert {"rollout", "reference", "update", "optimizer"} <= set(side["time"])
        assert all(t > 0 for t in side["time"].values())
        assert side["counts"]["sequences"] == 8  # 2 prompts x G=4
        assert 0 < side["counts"]["completion_tokens"] <= 8 * 6
        assert side["update_mfu"] is None  # no peak FLOP/s known for a CPU
    # the same prompts, tokenized alike by both sides
    assert ours["counts"]["prompt_tokens"] == trl["counts"]["prompt_tokens"]


def test_lora_knob_reaches_our_module_only(compose_cfg):
    from hcm.bench.run import fine_tuning

    full = compose_cfg("bench", [])
    assert full.module.get("lora") is None
    assert fine_tuning(full) == {"ours": "full", "trl": "full"}
    cfg = compose_cfg("bench", ["lora=default"])
    assert cfg.module.lora.rank == 16 and cfg.module.lora.alpha == 32
    assert fine_tuning(cfg) == {"ours": "LoRA (rank 16, alpha 32)", "trl": "full"}


def test_logprob_phase_names_the_reference_by_predicate():
    ref, policy = object(), object()
    phase = timing.logprob_phase(lambda model: model is ref)
    assert phase(ref) == "reference"
    assert phase(policy) == "update"  # grad on
    with torch.no_grad():
        assert phase(policy) == "old_logprobs"


@pytest.mark.slow
def test_tiny_lora_bench_times_the_adapters_off_reference(compose_cfg):
    from hcm.bench.run import run_bench

    cfg = compose_cfg(
        "bench",
        [
            "arch=tiny",
            "lora=default",
            "sides=[ours]",
            "workload.prompts=2",
            "workload.text_tokens=16",
            "module.sampling.max_new_tokens=6",
            "warmup=0",
            "repeats=1",
        ],
    )
    results = run_bench(cfg)
    ours = results["sides"]["ours"]
    assert {"rollout", "reference", "update", "optimizer"} <= set(ours["time"])
    assert "old_logprobs" not in ours["time"]  # the adapters-off forward is the reference
    params = ours["parameters"]
    assert 0 < params["trained"] < params["total"] / 4  # adapters only (rank 16 on a tiny model)
    assert "trained: ours LoRA (rank 16, alpha 32), TRL full" in results["table"]
