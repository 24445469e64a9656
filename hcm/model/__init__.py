"""InternVL3 loading, the tiny test model, input building and generation helpers."""
