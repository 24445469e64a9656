"""hcm: HCM-GRPO for screening AI-generated product images."""
