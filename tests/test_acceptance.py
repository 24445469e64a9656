"""The GPU acceptance run (python -m hcm.acceptance): its tiny size end to end on CPU, a check
that fails failing the run, each section's verdict rules, the memory table it reads against
README's and the bench model's parameter counts, and the flash-attn check's code on CPU."""

from __future__ import annotations

import doctest
import json
import re
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import hcm.acceptance.memory
from hcm.acceptance import checks
from hcm.acceptance.__main__ import main
from hcm.acceptance.checks import CHECKS, junit_outcomes
from hcm.acceptance.memory import memory_verdict, parameters_verdict
from hcm.acceptance.report import Section, overall_status
from hcm.acceptance.run import load_spec, missing

REPO = Path(__file__).resolve().parents[1]
STATES = {"pass", "fail", "skipped"}


def report(folder: Path) -> dict:
    return json.loads((folder / "acceptance.json").read_text())


@pytest.mark.slow  # ~50 s on 2 cores: two tiny bench runs, a pytest subprocess, gpu_hcm shrunk
def test_tiny_run_reports_every_check(tmp_path, capsys):
    out = tmp_path / "acceptance"
    code = main(["--size", "tiny", "--out", str(out)])
    data = report(out)
    assert code == 0 and data["status"] in ("pass", "incomplete")
    assert data["size"] == "tiny" and data["command"].endswith(f"--size tiny --out {out}")
    assert {"device", "torch", "transformers", "flash-attn", "torchvision"} <= set(
        data["environment"]
    )
    sections = data["sections"]
    assert list(sections) == list(CHECKS)
    for name, s in sections.items():
        assert s["status"] in STATES, name
        assert s["criteria"] or s["status"] == "skipped", name
        assert all(c["status"] in STATES for c in s["criteria"]), name
    cuda = torch.cuda.is_available()
    # bench: both runs, every phase of each side timed; the memory rows are gpu-size only
    bench = sections["bench"]
    assert bench["status"] == "pass", bench
    per_side = bench["figures"]["full: per side"]
    assert set(per_side) == {"ours", "trl"} and per_side["ours"]["trained"] == "full"
    lora = bench["figures"]["lora: per side"]["ours"]
    assert (
        lora["trained"].startswith("LoRA") and 0 < lora["trained parameters"] < lora["parameters"]
    )
    assert per_side["ours"]["trained parameters"] == per_side["ours"]["parameters"]
    timed = [c for c in bench["criteria"] if "timed every phase" in c["name"]]
    assert len(timed) == 3 and {c["status"] for c in timed} == {"pass"}  # full: ours, trl; lora
    assert "| rollout |" in bench["figures"]["lora: table"]
    # parity: the test ran, or skipped itself for want of torchvision
    parity = sections["parity"]
    has_torchvision = data["environment"]["torchvision"] is not None
    assert parity["status"] == ("pass" if has_torchvision else "skipped"), parity
    if not has_torchvision:
        assert "torchvision" in parity["reason"]
    # flash_grpo: needs CUDA and flash_attn, never passed without them
    if not cuda:
        assert sections["flash_grpo"]["status"] == "skipped"
        assert sections["flash_grpo"]["reason"] == "no CUDA"
        assert data["status"] == "incomplete"
    # science_arm: gpu_hcm's six stages, both evaluations on the 4 test samples
    arm = sections["science_arm"]
    assert arm["status"] == "pass", arm
    assert arm["criteria"][0] == {
        "name": "every stage finished (stage.json)",
        "status": "pass",
        "detail": "6/6",
    }
    assert {k: v["count"] for k, v in arm["figures"]["evaluations"].items()} == {
        "sft_eval": 4,
        "grpo_eval": 4,
    }
    assert arm["figures"]["training stages"]["grpo"]["hard cases"] > 0
    markdown = (out / "acceptance.md").read_text()
    assert markdown.startswith(f"# hcm acceptance run: {data['status']}")
    for name, s in sections.items():
        assert f"| {name} | {s['status']} |" in markdown
        assert f"## {name}: " in markdown
    assert "acceptance: " in capsys.readouterr().out


def test_a_check_that_raises_fails_the_run(tmp_path, monkeypatch):
    def broken(settings, spec, folder, section):
        section.require("reached", True)
        raise RuntimeError("broken on purpose")

    monkeypatch.setitem(CHECKS, "bench", ("a broken check", broken))
    out = tmp_path / "acceptance"
    assert main(["--size", "tiny", "--out", str(out), "--only", "bench"]) == 1
    data = report(out)
    assert data["status"] == "fail"
    bench = data["sections"]["bench"]
    assert bench["status"] == "fail" and bench["reason"] == "RuntimeError: broken on purpose"
    assert "broken on purpose" in bench["figures"]["traceback"]
    for name in ("parity", "flash_grpo", "science_arm"):
        assert data["sections"][name] == {
            **data["sections"][name],
            "status": "skipped",
            "reason": "not selected (--only)",
        }


def test_a_failed_criterion_fails_the_run(tmp_path, monkeypatch):
    def wrong(settings, spec, folder, section):
        section.require("one right", True)
        section.require("one wrong", False, "measured 2, expected 1")

    monkeypatch.setitem(CHECKS, "science_arm", ("a wrong check", wrong))
    out = tmp_path / "acceptance"
    assert main(["--size", "tiny", "--out", str(out), "--only", "science_arm"]) == 1
    arm = report(out)["sections"]["science_arm"]
    assert (arm["status"], arm["reason"]) == ("fail", "one wrong")
    assert "- fail: one wrong (measured 2, expected 1)" in (out / "acceptance.md").read_text()


@pytest.mark.parametrize(
    ("criteria", "status"),
    [
        ([], "fail"),  # nothing checked: a check must be able to fail
        ([True], "pass"),
        ([True, None], "pass"),
        ([None, None], "skipped"),
        ([True, False, None], "fail"),
    ],
)
def test_section_status_from_its_criteria(criteria, status):
    section = Section("a check")
    for i, ok in enumerate(criteria):
        section.require(f"c{i}", ok, "why")
    section.close()
    assert section.status == status


@pytest.mark.parametrize(
    ("states", "overall"),
    [
        (["pass", "pass"], "pass"),
        (["pass", "skipped"], "incomplete"),
        (["skipped", "skipped"], "incomplete"),
        (["pass", "fail", "skipped"], "fail"),
        ([], "fail"),
    ],
)
def test_overall_status(states, overall):
    sections = {}
    for i, state in enumerate(states):
        sections[str(i)] = Section("s", status=state)
    assert overall_status(sections) == overall


def test_help_names_the_sizes(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--size {gpu,tiny}" in text and "--only" in text and "acceptance.json" in text


def test_needs_gate_the_checks():
    assert missing([]) is None and missing(["json"]) is None
    assert missing(["no_such_module_hcm"]) == "no no_such_module_hcm (not installed)"
    if not torch.cuda.is_available():
        assert missing(["cuda", "json"]) == "no CUDA"


def test_junit_outcomes(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="t" name="off"><skipped message="no torchvision"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert junit_outcomes(path) == {
        "ok": ("passed", ""),
        "bad": ("failed", "assert 1 == 2"),
        "off": ("skipped", "no torchvision"),
    }


def test_every_size_sets_every_check():
    spec = load_spec()
    for size, settings in spec["sizes"].items():
        assert set(settings) == set(CHECKS), size
        for job in settings["bench"]["runs"].values():
            assert job["memory"] is None or job["memory"] in spec["memory_table"]


# -- README's memory table ------------------------------------------------------------------------
def readme_memory_table() -> dict[str, dict]:
    """The rows of README's memory table, as conf/acceptance.yaml's memory_table writes them."""
    text = (REPO / "README.md").read_text()
    head = "| stage | weights | trained weights + grads + AdamW | reference |"
    lines = text[text.index(head) :].splitlines()[2:]

    def lead(cell: str) -> float:  # "8.4 (fp32)" -> 8.4, "~6.7" -> 6.7
        return float(re.match(r"~?([\d.]+)", cell)[1])

    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        stage, weights, trained, reference, total, activations = (
            c.strip() for c in line.strip("|").split("|")
        )
        gb, count, unit = re.fullmatch(r"([\d.]+) \(([\d.]+)([MB])\)", trained).groups()
        rows[stage] = {
            "weights": lead(weights),
            "trained": float(gb),
            "trained_params": round(float(count) * {"M": 1e6, "B": 1e9}[unit]),
            "reference": lead(reference) if reference[0].isdigit() else None,
            "total": float(total),
            "activations": lead(activations),
        }
    return rows


def test_readme_memory_table_is_the_configs():
    table = load_spec()["memory_table"]
    for row in table.values():
        row["trained_params"] = round(row["trained_params"])
    assert len(table) == 8
    assert readme_memory_table() == table


@pytest.mark.parametrize(("arch", "size"), [("internvl3_1b", "1B"), ("internvl3_2b", "2B")])
def test_the_bench_model_trains_what_the_memory_table_counts(arch, size):
    """hcm.bench's random InternVL3 (on the meta device: no weights) has the parameters the
    table's GRPO rows count, all trained or through LoRA adapters on all three components."""
    from transformers import InternVLForConditionalGeneration

    from hcm.model import lora
    from hcm.model.tiny import TinySizes, tiny_config

    class Tok:  # what tiny_config reads of a tokenizer with InternVL3's vocabulary
        eos_token_id, pad_token_id, context_image_token_id = 2, 0, 5

        def __len__(self):
            return 151674

    bench = OmegaConf.load(REPO / "conf" / "bench.yaml")
    lora_cfg = OmegaConf.load(REPO / "conf" / "lora" / "default.yaml")
    table = load_spec()["memory_table"]
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(
            tiny_config(Tok(), TinySizes(**bench.architectures[arch].sizes))
        )
    total = sum(p.numel() for p in model.parameters())
    assert parameters_verdict(total, table[f"{size} GRPO, full"])[0], total
    freeze = {"vision_tower": False, "projector": False, "language_model": False}  # GRPO
    args = {k: v for k, v in OmegaConf.to_container(lora_cfg).items() if k != "save_adapter"}
    lora.add_adapters(model, freeze, **args)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameters_verdict(adapters, table[f"{size} GRPO, LoRA"])[0], adapters


@pytest.mark.parametrize(
    ("peak_gb", "ok"), [(37.5, False), (37.6, True), (50.0, True), (66.4, True), (66.6, False)]
)
def test_memory_verdict_bounds(peak_gb, ok):
    row = {"total": 37.6, "activations": 6.7}
    assert memory_verdict(peak_gb * 1e9, row, ceiling=1.5)[0] is ok


def test_memory_doctests():
    assert doctest.testmod(hcm.acceptance.memory).failed == 0


@pytest.mark.slow  # ~10 s: one tiny GRPO stage, then the model twice
def test_flash_grpo_check_runs_on_cpu_with_sdpa_against_eager(tmp_path):
    """The flash_grpo check's own code, on CPU: the step at 32-true, sdpa against eager."""
    settings = dict(load_spec()["sizes"]["tiny"]["flash_grpo"])
    settings["overrides"] = [
        o.replace("trainer=gpu", "trainer=cpu").replace("flash_attention_2", "sdpa")
        for o in settings["overrides"]
    ]
    settings |= {"compare": ["sdpa", "eager"], "autocast": None, "tolerance": 1e-4}
    section = Section("flash_grpo on CPU")
    checks.flash_grpo(settings, load_spec(), tmp_path / "flash", section)
    section.close()
    assert section.status == "pass", section.criteria
    assert section.figures["step settings"] == {
        "precision": "32-true",
        "attention": "sdpa",
        "accelerator": "cpu",
    }
    assert section.figures["step"]["train/kl"] == 0.0  # the first step: policy = reference
    found = section.figures["log-probs, padded batch"]
    assert found["loaded"] == {"sdpa": "sdpa", "eager": "eager"}
    assert len(found["row_mean_abs"]) == 2 and found["max_abs"] < 1e-4


def test_gpu_size_configs_compose_and_validate(tmp_path):
    """What --size gpu runs, composed and checked on CPU (nothing trains): the bench runs, the
    flash-attn step and every stage of the capped gpu_hcm pipeline."""
    from hcm.config import validate
    from hcm.train import compose_stages

    gpu = load_spec()["sizes"]["gpu"]
    try:
        for run, job in gpu["bench"]["runs"].items():
            cfg = checks.compose_config("bench", [*gpu["bench"]["overrides"], *job["overrides"]])
            assert cfg.arch == "internvl3_2b" and cfg.model.name_or_path.endswith("InternVL3-2B-hf")
            assert (cfg.module.get("lora") is not None) == (run == "lora"), run
        step = checks.with_folder(gpu["flash_grpo"]["overrides"], tmp_path)
        cfg = checks.compose_config("train", [*step, f"paths.output_dir={tmp_path}"])
        validate(cfg)
        assert (cfg.trainer.precision, cfg.model.attn_implementation) == (
            "bf16-mixed",
            "flash_attention_2",
        )
        assert cfg.model.name_or_path == f"{tmp_path}/init-model"
        assert cfg.model.tiny.text_hidden_size == 384 and cfg.trainer.max_steps == 1
        arm = [*gpu["science_arm"]["overrides"], f"paths.output_dir={tmp_path}"]
        cfg = checks.compose_config("train", arm)
        stages = compose_stages(cfg)
        assert [name for name, _, _ in stages] == [
            "base", "sft", "sft_eval", "grpo_all", "grpo", "grpo_eval"
        ]  # fmt: skip
        for name, _, stage in stages:
            validate(stage)
            assert stage.trainer.precision == "bf16-mixed", name
            assert stage.trainer.max_epochs == 2 and stage.trainer.limit_test_batches == 1, name
            if stage.job_type != "eval":
                assert stage.trainer.limit_train_batches == 4, name
        assert stage.data.eval_batch_size == gpu["science_arm"]["eval_count"]
    finally:
        GlobalHydra.instance().clear()


def test_a_failed_bench_run_fails_the_section_and_the_next_run_still_runs(tmp_path, monkeypatch):
    import hcm.bench.run

    seen = []

    def fake_bench(cfg):
        seen.append(list(cfg.sides))
        if "trl" in cfg.sides:
            raise torch.cuda.OutOfMemoryError("TRL out of memory")
        phases = {p: 0.5 for p in checks.PHASES}
        ours = {
            "steps": 1,
            "time": phases,
            "step_time": 2.0,
            "peak_bytes": dict.fromkeys(phases, 0),
            "counts": {"sequences": 8, "prompt_tokens": 30, "completion_tokens": 40},
            "update_mfu": None,
            "allocated_before_bytes": 0,
            "parameters": {"total": 100, "trained": 10},
        }
        return {"table": "| phase |", "sides": {"ours": ours}, "fine_tuning": {"ours": "LoRA"}}

    monkeypatch.setattr(hcm.bench.run, "run_bench", fake_bench)
    section = Section("bench")
    checks.bench(load_spec()["sizes"]["tiny"]["bench"], load_spec(), tmp_path, section)
    section.close()
    assert seen == [["ours", "trl"], ["ours"]]
    assert section.status == "fail" and section.reason == "full: the bench ran"
    assert section.criteria[0]["detail"] == "OutOfMemoryError: TRL out of memory"
    assert [c["status"] for c in section.criteria[1:]] == ["pass", "skipped"]  # lora's
    assert section.figures["lora: per side"]["ours"]["step tokens/s"] == 20.0
    assert "OutOfMemoryError" in section.figures["full: traceback"]
