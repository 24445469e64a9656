"""LightningModules: Stage-1 SFT and Stage-2 GRPO over a shared screening base."""
