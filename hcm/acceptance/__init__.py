"""The GPU acceptance run: one command, four checks, one JSON and one Markdown report.

    python -m hcm.acceptance                  # --size gpu where CUDA is (one H100/H200), else tiny
    python -m hcm.acceptance --size tiny      # every check at tiny size on CPU: CI's smoke run

The checks (conf/acceptance.yaml sets each one's sizes):
    bench        hcm.bench, ours against TRL, full fine-tuning and LoRA: time per phase, tokens/s,
                 peak memory against README's memory table (`memory_table` in the config)
    parity       tests/test_inputs.py's InternVLProcessor parity test (needs torchvision)
    flash_grpo   one GRPO step under bf16-mixed with flash-attn, and flash against sdpa
                 log-probs on a left-padded batch (needs CUDA and flash_attn)
    science_arm  experiment=gpu_hcm (sweeps/science_gpu_table6.yaml's HCM arm), steps capped

Each check is a section of the report: pass, fail or skipped (with the reason: no CUDA, no
flash_attn, no torchvision), its criteria one by one and its measured figures. A check that
raises fails; the run's status is "fail" when any check failed (exit status 1), "pass" when
every check passed, and "incomplete" when none failed but some were skipped.
"""
