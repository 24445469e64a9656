"""Public benchmarks of section 5.4 (RealWorldQA, MuirBench, BLINK) on the same machinery."""
