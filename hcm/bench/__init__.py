"""The GRPO-step benchmark: our GRPOModule against TRL's GRPOTrainer on the paper's workload.

    python -m hcm.bench arch=internvl3_2b          # on a GPU: one table, bench.json beside it
    python -m hcm.bench arch=tiny                  # CPU smoke run (timings mean nothing there)

Both sides train the same random-weight InternVL3 (built from its config, no download) on the
same prompts: per phase (rollout, reference, update, optimizer) the median time and peak memory
after warm-up, tokens/s, the update's MFU, and ours/TRL. Needs, beyond the GPU image's torch,
transformers and Lightning: trl (1.16), hydra-core, and trl's own dependencies (accelerate,
datasets). See README "Performance".
"""
