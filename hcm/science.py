"""What a sweep's arms did beyond their headline score, read from the files each run left, and
the figure of a table's scores per seed (`<table>_scores.png`).

Made for a science sweep comparing arms (SFT, +GRPO, +DPA-GRPO, +HCM-GRPO, or Table 7's data
compositions) over seeds; each section goes into the report's Markdown only when its data exists:
- Per-dimension scores: `test/score/<dimension>` of each run's metrics.json, mean over seeds;
  "n/a" where no held-out sample has the dimension (its count is 0). Left out when the table's
  own columns show every dimension (Table 3).
- Judgement (hcm.judgement): exact match, the balanced per-candidate score, faithfulness and the
  share of answers naming one option, mean over seeds, from metrics.json.
- Paired differences from the baseline row, per sample: from both rows' predictions.jsonl of
  each seed they share (the same test ids), the mean gain in overall score with a 95% interval
  from a two-level bootstrap (seeds, then samples within each seed; hcm.stats), beside the
  paired-by-seed t interval of the table, and the mean discordance (the share of samples
  exactly one of the two got right).
- Detection rate per defect family (the synthetic benchmark's `meta`; see `detection_counts`).
  The test manifest is `<data.root>/<split>.jsonl`, its root taken from the `stage.json` of the
  job's stages and accepted only if its sha256 is the one the evaluation recorded.
- Zero-variance groups: the share of GRPO groups whose G rewards were all equal (no advantage,
  no gradient), mean over the GRPO stage's logged steps (`train/zero_variance_groups`), then
  over seeds. Hard-case mining exists to lower it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from hcm.aggregate import Run, markdown_table
from hcm.curves import Panel, Points, draw, per_epoch, read_curve
from hcm.data.manifest import manifest_hash
from hcm.data.synthetic.render import FAMILIES
from hcm.gallery import read_predictions
from hcm.screening import DIMENSIONS, NONE_ANSWER
from hcm.stats import (
    BOOTSTRAP_DRAWS,
    between_seed_sd,
    hierarchical_bootstrap,
    minimum_detectable_difference,
    seeds_needed,
)

log = logging.getLogger(__name__)

CLEAN = "clean"  # candidates without a defect: their rate is the share the answer kept
JUDGEMENT = {  # metrics.json key (test/score/...) -> column
    "exact_match": "Exact match",
    "judgement/balanced": "Balanced",
    "faithful": "Faithful",
    "answer_size/1": "Names 1 option",
}
REWARD = "train/reward/total"
ZERO_VARIANCE = "train/zero_variance_groups"


# -- pure ----------------------------------------------------------------------------------------
def detection_counts(
    predictions: Iterable[Mapping[str, Any]], candidates: Mapping[str, Sequence[Mapping]]
) -> dict[str, list[int]]:
    """Per defect family, [detected, candidates]: of the candidates carrying that family's
    defect, how many the model's answer excluded. A candidate with defects of two families
    counts for both. An invalid answer (`parsed` null) detects nothing; "N" excludes every
    candidate. `clean` counts the defect-free candidates and how many the answer kept, so that
    answering "N" everywhere cannot pass for detection.

    `predictions` are predictions.jsonl rows, `candidates` each sample's `meta["candidates"]`
    from the test manifest ({"letter": "A", "defects": [{"family": "floating", ...}]}).

    >>> meta = {"s0": [{"letter": "A", "defects": [{"family": "floating"}]},
    ...                {"letter": "B", "defects": []},
    ...                {"letter": "C", "defects": [{"family": "floating"}, {"family": "colour"}]},
    ...                {"letter": "D", "defects": []}]}
    >>> detection_counts([{"id": "s0", "parsed": "BC"}], meta)
    {'floating': [1, 2], 'clean': [1, 2], 'colour': [0, 1]}
    >>> detection_counts([{"id": "s0", "parsed": None}], meta)["floating"]
    [0, 2]
    """
    counts: dict[str, list[int]] = {}
    for p in predictions:
        if p["id"] not in candidates:
            continue
        parsed = p.get("parsed")
        kept = set() if parsed in (None, NONE_ANSWER) else set(parsed)
        for cand in candidates[p["id"]]:
            families = {d["family"] for d in cand["defects"]}
            kept_it = cand["letter"] in kept
            for family in sorted(families) or [CLEAN]:
                tally = counts.setdefault(family, [0, 0])
                right = kept_it if family == CLEAN else parsed is not None and not kept_it
                tally[0] += int(right)
                tally[1] += 1
    return counts


def mean_over_runs(curves: Sequence[Mapping[int, float]]) -> dict[int, float]:
    """Each key's mean over the runs that have it.

    >>> mean_over_runs([{0: 1.0, 1: 2.0}, {0: 3.0}])
    {0: 2.0, 1: 2.0}
    """
    keys = sorted({k for c in curves for k in c})
    return {k: sum(c[k] for c in curves if k in c) / sum(k in c for c in curves) for k in keys}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- reading a run's files -----------------------------------------------------------------------
@cache
def _candidates(path: Path, digest: str | None) -> dict[str, list] | None:
    if not path.is_file() or (digest is not None and manifest_hash(path) != digest):
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metas = {r["id"]: (r.get("meta") or {}).get("candidates") for r in rows}
    return {k: v for k, v in metas.items() if v} or None


def manifest_candidates(run: Run) -> dict[str, list] | None:
    """The candidates' defects of every sample of the run's test manifest, or None."""
    split = run.payload.get("split")
    if run.job.folder is None or not split:
        return None
    digest = (run.payload.get("manifest_hashes") or {}).get(split)
    for marker in sorted((run.job.folder / "stages").glob("*/stage.json")):
        config = json.loads(marker.read_text()).get("config") or {}
        root = (config.get("data") or {}).get("root")
        if root and (found := _candidates(Path(root) / f"{split}.jsonl", digest)) is not None:
            return found
    return None


def run_detection(run: Run) -> dict[str, list[int]]:
    """Per family (and `clean`), the run's `detection_counts`; {} without the files."""
    predictions = None if run.folder is None else run.folder / "predictions.jsonl"
    if predictions is None or not predictions.is_file():
        return {}
    candidates = manifest_candidates(run)
    if candidates is None:
        return {}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    return detection_counts(rows, candidates)


def run_correctness(run: Run) -> dict[str, bool] | None:
    """Per test id, whether the run's answer was right; None without its predictions.jsonl."""
    path = None if run.folder is None else run.folder / "predictions.jsonl"
    if path is None or not path.is_file():
        return None
    return {str(r["id"]): bool(r.get("correct")) for r in read_predictions(path)}


def paired_differences(runs: Sequence[Run], base: Sequence[Run]) -> list[list[int]]:
    """Per seed both rows ran and whose predictions cover the same ids, the per-sample
    differences in correctness (row minus baseline: -1, 0, +1), in id order."""
    theirs = {r.seed: r for r in base}
    out = []
    for run in runs:
        if run.seed not in theirs:
            continue
        mine, other = run_correctness(run), run_correctness(theirs[run.seed])
        if mine and other and mine.keys() == other.keys():
            out.append([int(mine[i]) - int(other[i]) for i in sorted(mine)])
    return out


def run_zero_variance(run: Run, own: bool = False) -> float | None:
    """The share of zero-variance groups over the GRPO training behind the run's model, or
    (`own`) over the stage that trained it alone: a Table 7 arm's own epochs, not the shared
    prefix every arm has (`Run.curves` lists the scored stage first)."""
    if run.curves is None:
        return None
    return _mean(read_curve(run.curves[:1] if own else run.curves, ZERO_VARIANCE)[1])


def run_reward(run: Run) -> dict[int, float]:
    if run.curves is None:
        return {}
    return per_epoch(*read_curve(run.curves, REWARD, "epoch"))


# -- the report's sections -----------------------------------------------------------------------
def _num(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def dimension_section(rows, names, decimals: int) -> str:
    lines = []
    for name, row in zip(names, rows, strict=True):
        cells = []
        for d in DIMENSIONS:  # a dimension no held-out sample has scores 0: n/a instead
            scored = [r.score(d) for r in row.runs if r.questions(d)]
            cells.append(_num(_mean([s for s in scored if s is not None]), decimals))
        if row.runs and any(r.score(d) is not None for r in row.runs for d in DIMENSIONS):
            lines.append([name, *cells])
    if not lines:
        return ""
    head = ["Row", *(d.replace("_", " ").title() for d in DIMENSIONS)]
    note = "Per-dimension held-out scores, mean over seeds (n/a: no held-out sample has it)."
    return f"\n**Scores per dimension**\n\n{markdown_table(head, lines)}\n{note}\n"


def _signed(value: float, lo: float, hi: float, decimals: int) -> str:
    return f"{value:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"


def judgement_section(rows, names, decimals: int) -> str:
    lines = []
    for name, row in zip(names, rows, strict=True):
        means = [_mean([s for r in row.runs if (s := r.score(k)) is not None]) for k in JUDGEMENT]
        if means[1] is not None:  # runs from before the balanced score have none of these
            lines.append([name, *(_num(m, decimals) for m in means)])
    if not lines:
        return ""
    head = ["Row", *JUDGEMENT.values()]
    note = (
        "Mean over seeds (%). Balanced: the mean of the shares of unacceptable candidates the "
        "answer leaves out and of acceptable ones it keeps, pooled over all candidates (an "
        "invalid answer judges none right); naming fewer options cannot raise it as it raises "
        "the overall score. Faithful: of the completions whose CoT states a verdict for all four "
        "candidates, the share whose answer is the set those verdicts call acceptable "
        "(hcm.judgement). Names 1 option: the share of answers naming exactly one."
    )
    return f"\n**Judgement**\n\n{markdown_table(head, lines)}\n{note}\n"


def paired_section(rows, names, decimals: int) -> str:
    lines = []
    for name, row in zip(names, rows, strict=True):
        if row.base is None:
            continue
        differences = paired_differences(row.runs, row.base.runs)
        if not differences:
            continue
        by_seed = "-"
        if "overall" in row.delta_intervals:
            by_seed = _signed(row.deltas["overall"], *row.delta_intervals["overall"], decimals)
        both = _signed(*(100 * x for x in hierarchical_bootstrap(differences)), decimals)
        discordance = _mean([100 * sum(map(abs, d)) / len(d) for d in differences])
        lines.append([name, by_seed, both, _num(discordance, decimals), str(len(differences))])
    if not lines:
        return ""
    head = ["Row", "Δ overall, by seed (t)", "Δ overall, seeds × samples", "Discordance", "Seeds"]
    note = (
        "Difference from the section's baseline row, paired by seed and by test sample. By seed: "
        "the table's t interval of per-seed differences (seed variation only). Seeds × samples: "
        f"the mean per-sample gain and the 95% percentile interval of {BOOTSTRAP_DRAWS} draws "
        "resampling the seeds, then the test samples within each drawn seed (both levels of "
        "variation; seeded). Discordance: the share (%) of test samples exactly one of the two "
        "models got right, mean over seeds. Seeds: the seeds both rows ran with the same test ids."
    )
    return f"\n**Paired differences**\n\n{markdown_table(head, lines)}\n{note}\n"


POWER_TARGET = 3.0  # points: the difference the science design must detect (issue 20)


def power_section(rows, names, decimals: int) -> str:
    """What the design could detect: from each row's per-seed paired gains over its baseline,
    the seed-to-seed sd of the true gain, the smallest gain these seeds x test samples detect
    (80% power, 5% two-sided), and the seeds that would detect POWER_TARGET points."""
    lines = []
    for name, row in zip(names, rows, strict=True):
        if row.base is None:
            continue
        differences = paired_differences(row.runs, row.base.runs)
        if len(differences) < 2:
            continue
        n = min(len(d) for d in differences)
        gains = [100 * sum(d) / len(d) for d in differences]
        discordance = _mean([100 * sum(map(abs, d)) / len(d) for d in differences])
        sd = between_seed_sd(gains, discordance, n)
        mde = minimum_detectable_difference(discordance, sd, len(gains), n)
        need = seeds_needed(POWER_TARGET, discordance, sd, n)
        cells = [_num(sd, decimals), _num(mde, decimals), str(need) if need else "> 100"]
        lines.append([name, *cells, f"{len(gains)} x {n}"])
    if not lines:
        return ""
    head = [
        "Row",
        "Seed sd of the gain",
        "Detectable gain",
        f"Seeds for {POWER_TARGET:g}",
        "Design",
    ]
    note = (
        "Power of the design, from the paired per-seed gains over the baseline: their sd less "
        "the sampling variance of n test samples (seed sd, points; hcm.stats.between_seed_sd); "
        "the smallest true gain this design (seeds x test samples) detects with 80% power at 5% "
        "two-sided; and how many seeds would detect "
        f"{POWER_TARGET:g} points at this test size (hcm.stats.minimum_detectable_difference)."
    )
    return f"\n**Power**\n\n{markdown_table(head, lines)}\n{note}\n"


def family_section(rows, names, decimals: int) -> str:
    counts = [[run_detection(r) for r in row.runs] for row in rows]
    found = {f: n for per_row in counts for run in per_row for f, (_, n) in run.items()}
    families = [f for f in (*FAMILIES, CLEAN) if f in found]
    if not families:
        return ""
    lines = []
    for name, per_row in zip(names, counts, strict=True):
        if any(per_row):
            rates = [[100 * run[f][0] / run[f][1] for run in per_row if f in run] for f in families]
            lines.append([name, *(_num(_mean(r), decimals) for r in rates)])
    head = ["Row", *(f"{f} (n={found[f]})" for f in families)]
    note = (
        "Detection rate: of the test candidates carrying a defect of that family (n of them), "
        "the share (%) whose letter the model's parsed answer leaves out (an invalid answer "
        "detects nothing); `clean`: of the defect-free candidates, the share it keeps. Mean over "
        "seeds. Families belong to dimensions as in hcm.data.synthetic.render.FAMILIES."
    )
    return f"\n**Detection rate per defect family**\n\n{markdown_table(head, lines)}\n{note}\n"


def zero_variance_section(rows, names, decimals: int) -> str:
    lines = []
    for name, row in zip(names, rows, strict=True):
        shares = [s for r in row.runs if (s := run_zero_variance(r)) is not None]
        own = [s for r in row.runs if (s := run_zero_variance(r, own=True)) is not None]
        if shares:
            cells = [_num(100 * _mean(v), decimals) for v in (shares, own)]
            lines.append([name, *cells, str(len(shares))])
    if not lines:
        return ""
    head = ["Row", "Zero-variance groups (%), all GRPO epochs", "its own stage's epochs", "Seeds"]
    note = (
        "Share of GRPO groups whose G rewards were all equal (no advantage, no gradient): "
        "mean over the steps, then over seeds; over every GRPO epoch behind the row's model, "
        "and over its own stage's alone (a Table 7 arm's composition epochs, without the "
        "prefix all arms share)."
    )
    return f"\n**Zero-variance groups**\n\n{markdown_table(head, lines)}\n{note}\n"


def sections(spec: dict, rows: Sequence[Any], names: Sequence[str]) -> str:
    """The Markdown sections that the runs' files support, after the table ("" for none)."""
    decimals = int(spec.get("decimals", 2))
    keep = [(n, r) for n, r in zip(names, rows, strict=True) if r.runs]
    if not keep:
        return ""
    names, rows = [n for n, _ in keep], [r for _, r in keep]
    text = ""
    if not set(DIMENSIONS) <= set(spec["columns"]):
        text += dimension_section(rows, names, decimals)
    text += judgement_section(rows, names, decimals) + paired_section(rows, names, decimals)
    text += power_section(rows, names, decimals)
    text += family_section(rows, names, decimals)
    return text + zero_variance_section(rows, names, decimals)


# -- the figure ----------------------------------------------------------------------------------
def plot_scores(spec: dict, rows, names, random: Mapping, path: Path) -> Path | None:
    """Each row's held-out score per seed with its mean and interval, the random baseline
    dashed; and each row's GRPO reward per epoch, mean over seeds. None without any run."""
    column = next(iter(spec["columns"]))
    keep = [(n, r) for n, r in zip(names, rows, strict=True) if r.runs]
    scores = Points(
        f"held-out score ({spec['columns'][column]}): runs, mean, 95% interval\n"
        "(t over seeds; Wilson for a single run)",
        "score (%)",
        [n for n, _ in keep],
        [[s for run in r.runs if (s := run.score(column)) is not None] for _, r in keep],
        [r.values.get(column) for _, r in keep],
        [r.intervals.get(column) for _, r in keep],
        ("random", random[column]) if random.get(column) is not None else None,
    )
    curves = []
    for name, row in keep:
        reward = mean_over_runs([c for run in row.runs if (c := run_reward(run))])
        if reward:
            curves.append((name, list(reward), list(reward.values())))
    reward = Panel(f"GRPO reward ({REWARD}), mean over seeds", "epoch", curves)
    return draw([scores, reward], path, spec["title"])
