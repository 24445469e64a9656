"""The benchmark's table: per phase time and peak memory of each side, tokens/s, MFU, ours/TRL."""

from __future__ import annotations

from typing import Any

PHASES = ("rollout", "reference", "old_logprobs", "update", "optimizer", "step")
LABELS = {"step": "other (clip, log)"}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def phase_rows(side: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per phase: seconds, peak GiB (None on CPU) and tokens/s, plus the whole step."""
    t, peak, counts = side["time"], side["peak_bytes"], side["counts"]
    seqs, prompt = counts.get("sequences", 0), counts.get("prompt_tokens", 0)
    generated = counts.get("completion_tokens", 0)
    processed = seqs * prompt + generated  # tokens of one forward over the rollout
    throughput = {"rollout": generated, "reference": processed, "update": processed}
    rows = {}
    for name in PHASES:
        if name not in t:
            continue
        rows[name] = {
            "seconds": t[name],
            "peak_gib": peak[name] / 2**30 if peak.get(name) else None,
            "tokens_per_s": throughput[name] / t[name] if name in throughput and t[name] else None,
        }
    rows["whole step"] = {
        "seconds": side["step_time"],
        "peak_gib": max(peak.values()) / 2**30 if any(peak.values()) else None,
        "tokens_per_s": generated / side["step_time"] if side["step_time"] else None,
    }
    return rows


def format_table(results: dict[str, Any]) -> str:
    """One markdown table: a row per phase, columns per side and the ours/TRL ratios."""
    sides = results["sides"]
    ours, trl = sides.get("ours"), sides.get("trl")
    rows = {name: phase_rows(side) for name, side in sides.items()}
    names = [n for n in (*PHASES, "whole step") if any(n in r for r in rows.values())]
    head = (
        "| phase | ours s | TRL s | ours/TRL time | ours peak GiB | TRL peak GiB "
        "| ours tok/s | TRL tok/s |"
    )
    lines = [head, "|" + "---|" * 8]
    for name in names:
        o = rows.get("ours", {}).get(name, {})
        r = rows.get("trl", {}).get(name, {})
        lines.append(
            f"| {LABELS.get(name, name)} | {_num(o.get('seconds'), '.3f')} "
            f"| {_num(r.get('seconds'), '.3f')} | {_ratio(o.get('seconds'), r.get('seconds'))} "
            f"| {_num(o.get('peak_gib'), '.2f')} | {_num(r.get('peak_gib'), '.2f')} "
            f"| {_num(o.get('tokens_per_s'), ',.0f')} | {_num(r.get('tokens_per_s'), ',.0f')} |"
        )
    mfu = [
        f"{label} {_num(side.get('update_mfu'), '.1%')}"
        for label, side in (("ours", ours), ("TRL", trl))
        if side is not None
    ]
    env = results["environment"]
    work = results["workload"]
    tuned = results.get("fine_tuning", {"ours": "full", "trl": "full"})
    lines += [
        "",
        f"update MFU: {', '.join(mfu)} (peak {_num(results.get('peak_tflops'), '.0f')} "
        "TFLOP/s; model FLOPs, recomputation not counted)",
        f"workload: {work['prompts']} prompts x G={work['group_size']}, prompt tokens "
        + ", ".join(f"{k} {int(s['counts'].get('prompt_tokens', 0))}" for k, s in sides.items())
        + f", {work['completion_tokens']} sampled tokens; arch {results['arch']}; medians of "
        f"{results['repeats']} steps after {results['warmup']} warm-up",
        f"trained: ours {tuned['ours']}, TRL {tuned['trl']}",
        "tok/s: rollout = sampled tokens/s; reference, update = prompt + completion tokens/s; "
        "whole step = sampled tokens/s",
        f"device {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"trl {env.get('trl') or '-'}, lightning {env['lightning']}",
    ]
    return "\n".join(lines)
