"""Data contract, the synthetic screening benchmark, the DataModule and the hard-case sampler."""
