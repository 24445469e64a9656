"""README's memory table against what the bench measured (pure functions, no I/O).

The table ("LoRA instead of full fine-tuning" in README.md; its numbers are `memory_table` in
conf/acceptance.yaml, and tests/test_acceptance.py checks the two agree) counts per device, in
GB (1e9 bytes), the weights, the trained weights with their gradients and AdamW's two moments,
and the frozen reference: the state resident at an optimizer step, "total before
activations", and an estimate of the activations on top, computed from parameter counts.

A measured peak below that total means the run holds less than the table counts (a weight in
another dtype, no second model): the table's premise is wrong. A peak above `ceiling` x (total +
activations) means it holds far more than the table says. The table's activations are for the
paper's batch (8 completions of ~3.8k tokens); the bench's step (32 of ~1k) has about as many
tokens, so the same estimate stands, within the ceiling's margin.
"""

from __future__ import annotations

from collections.abc import Mapping

GB = 1e9


def memory_verdict(peak_bytes: float, row: Mapping[str, float], ceiling: float) -> tuple[bool, str]:
    """Whether a measured peak (bytes) lies in [total, ceiling x (total + activations)] GB.

    >>> memory_verdict(44e9, {"total": 37.6, "activations": 6.7}, ceiling=1.5)[0]
    True
    >>> memory_verdict(20e9, {"total": 37.6, "activations": 6.7}, ceiling=1.5)
    (False, 'peak 20.0 GB; table: 37.6 GB before activations + ~6.7 GB; accepted 37.6-66.5 GB')
    """
    total, activations = row["total"], row["activations"]
    peak, high = peak_bytes / GB, ceiling * (total + activations)
    detail = (
        f"peak {peak:.1f} GB; table: {total} GB before activations + ~{activations} GB; "
        f"accepted {total:.1f}-{high:.1f} GB"
    )
    return total <= peak <= high, detail


def parameters_verdict(
    trained: int, row: Mapping[str, float], tolerance: float = 0.01
) -> tuple[bool, str]:
    """Whether the run trains the parameters the table counts (within `tolerance`, relative).

    >>> parameters_verdict(25_681_920, {"trained_params": 25.7e6})
    (True, '25.68M trained; table: 25.70M')
    """
    expected = row["trained_params"]
    detail = f"{trained / 1e6:,.2f}M trained; table: {expected / 1e6:,.2f}M"
    return abs(trained - expected) <= tolerance * expected, detail
