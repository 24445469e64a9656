"""A pipeline run's summary: the held-out screening score of every stage beside the random
baseline, printed as one table and written at the run's root (`summary.json`, `summary.md`,
`summary.png` with the curves).

The numbers are read from the stages' files, never from logs, so a rerun that skips finished
stages summarises them all the same:
- an eval stage: its `metrics.json` (`test/score/*`, on `data.eval_split`);
- an SFT or GRPO stage: the final validation kept in its `stage.json` (`val/score/*`: the model
  it exported, on the same held-out split); a stage that never validated has no row.

Each score carries its Wilson 95% interval (hcm.stats). A stage is compared with the nearest
earlier row that scored another model on the same held-out samples (same split and count):
GRPO against the SFT model it started from, the final evaluation against the last SFT stage
(skipping the GRPO row, which scored the same model). When both stages left a
`predictions.jsonl` over the same ids (two evaluations), the difference is paired: per sample,
and its interval Bonett and Price's paired one, with the discordance (the share of samples
exactly one of the two got right). Otherwise (a training stage's validation writes no
predictions) it is the interval of two independent scores, labelled "unpaired".
Beside the section-5.1 score each row has hcm.judgement's balanced per-candidate score,
faithfulness and answer-size distribution. The GRPO reward panel draws each epoch's mean over
the per-step line and marks the switch epoch. The curves come from each stage's CSV logger files
(`csv/metrics.csv` and the parts a resume kept, read as one by hcm.curves.read_log); without the
CSV logger there is no figure.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcm.curves import Panel, draw, log_parts, per_epoch, read_points
from hcm.data.hard_cases import HardCaseSet
from hcm.files import atomic_write_text
from hcm.gallery import PREDICTIONS, read_predictions
from hcm.judgement import SIZES
from hcm.screening import DIMENSIONS
from hcm.screening_score import HEADERS
from hcm.stats import difference_interval, paired_difference_interval, wilson_interval

log = logging.getLogger(__name__)

SCORES = ("overall", "count", "exact_match", "mean_dpa", "valid_rate", *DIMENSIONS)
JUDGEMENT = ("balanced", "left_out_unacceptable", "kept_acceptable")  # judgement/<key>
FAITHFULNESS = ("verdicts_stated", "faithful")


@dataclass
class StageScore:
    """One stage's held-out score: what was scored, on which split, and the section-5.1 metrics
    without their `val/score/` or `test/score/` prefix (percentages, and `count`)."""

    name: str
    kind: str  # sft | grpo | eval
    model: str  # the model folder that was scored
    split: str
    metrics: dict[str, float]
    folder: Path


def _unprefixed(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def read_stage(folder: Path) -> StageScore | None:
    """The held-out score a finished stage folder holds, None when it holds none."""
    folder = Path(folder)
    if (folder / "metrics.json").is_file():  # an evaluation
        payload = json.loads((folder / "metrics.json").read_text())
        metrics = _unprefixed(payload["metrics"], "test/score/")
        kind, model, split = "eval", str(payload.get("model", "")), str(payload.get("split", ""))
    elif (folder / "stage.json").is_file():  # a training stage: its final validation
        done = json.loads((folder / "stage.json").read_text())
        metrics = _unprefixed(done.get("metrics", {}), "val/score/")
        split = str(((done.get("config") or {}).get("data") or {}).get("eval_split", ""))
        kind, model = str(done.get("kind", "train")), str(done.get("model_dir", ""))
    else:
        return None
    if "overall" not in metrics or "count" not in metrics:
        return None
    return StageScore(folder.name, kind, model, split, metrics, folder)


def _same_model(a: str, b: str) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


def previous(scores: list[StageScore], i: int) -> StageScore | None:
    """The nearest earlier stage that scored another model on the same held-out samples."""
    s = scores[i]
    for p in reversed(scores[:i]):
        same_set = p.split == s.split and p.metrics["count"] == s.metrics["count"]
        if same_set and not _same_model(p.model, s.model):
            return p
    return None


def correct(s: StageScore) -> float:
    """How many held-out samples were answered correctly (the score is a percentage of count)."""
    return round(s.metrics["overall"] * s.metrics["count"] / 100)


def correctness(s: StageScore) -> dict[str, bool] | None:
    """Per sample id, whether the stage's answer was right; None without predictions.jsonl."""
    path = s.folder / PREDICTIONS
    if not path.is_file():
        return None
    return {str(r["id"]): bool(r.get("correct")) for r in read_predictions(path)}


def delta(prev: StageScore, s: StageScore) -> dict[str, Any]:
    """`s` minus `prev` (points) with its 95% interval: paired per sample when both stages'
    predictions cover the same ids, else as two independent scores ("unpaired")."""
    first, second = correctness(prev), correctness(s)
    if first is not None and second is not None and first.keys() == second.keys() and first:
        only_first = sum(first[i] and not second[i] for i in first)
        only_second = sum(second[i] and not first[i] for i in first)
        d, lo, hi = paired_difference_interval(only_first, only_second, len(first))
        out = {"interval": "paired", "discordance": 100 * (only_first + only_second) / len(first)}
    else:
        n = s.metrics["count"]
        d, lo, hi = difference_interval(correct(prev), prev.metrics["count"], correct(s), n)
        out = {"interval": "unpaired"}
    return {"stage": prev.name, "overall": 100 * d, "overall_ci": [100 * lo, 100 * hi], **out}


def summarize(scores: list[StageScore]) -> dict[str, Any]:
    """summary.json: the random baseline and, per stage, its scores, the 95% interval of the
    overall score, the balanced judgement, faithfulness and answer sizes, and the difference
    from the previous stage with its 95% interval."""
    final = scores[-1].metrics if scores else {}
    summary: dict[str, Any] = {
        "random_baseline": final.get("random_baseline"),
        "random_baseline_dimensions": {
            d: final.get(f"random_baseline/{d}") if final.get(f"count/{d}") != 0 else None
            for d in DIMENSIONS
        },
        "stages": {},
    }
    for i, s in enumerate(scores):
        n = s.metrics["count"]
        lo, hi = wilson_interval(correct(s), n)
        row: dict[str, Any] = {"kind": s.kind, "split": s.split, "model": s.model}
        row.update({k: s.metrics.get(k) for k in SCORES})
        for d in DIMENSIONS:  # a dimension no held-out sample has gets no score, not 0
            if s.metrics.get(f"count/{d}") == 0:
                row[d] = None
        row["count"] = int(n)
        row["overall_ci"] = [100 * lo, 100 * hi]
        # None where there was nothing to count (the metric leaves such a share out)
        row["judgement"] = {k: s.metrics.get(f"judgement/{k}") for k in JUDGEMENT}
        row.update({k: s.metrics.get(k) for k in FAITHFULNESS})
        row["answer_size"] = {k: s.metrics.get(f"answer_size/{k}") for k in SIZES}
        prev = previous(scores, i)
        if prev is not None:
            row["delta_vs_previous"] = delta(prev, s)
        cases = s.folder / "hard_cases.json"
        if cases.is_file():  # a GRPO stage's mining: how hard the training split was
            mined = HardCaseSet.load(cases)
            row["hard_cases"] = len(mined.hard_ids)
            row["train_cases"] = len(mined.hard_ids) + len(mined.easy_ids)
        summary["stages"][s.name] = row
    return summary


def _scored(name: str, row: dict, rows: dict) -> str:
    if row["kind"] != "eval":
        return f"{row['kind']}, last validation"
    owner = next(
        (k for k, r in rows.items() if k != name and _same_model(r["model"], row["model"])), None
    )
    return f"test of {owner or Path(row['model']).name or row['model']}"


def to_markdown(summary: dict[str, Any]) -> str:
    """The summary as one Markdown table: the random baseline, then a row per stage."""

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    head = ["Stage", "Scored", "Overall [95% CI]", "n", "Exact match", "Balanced", "Faithful"]
    head += ["Mean DPA", "Valid", *HEADERS[1:], "Δ overall [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = summary["stages"]
    count = next((r["count"] for r in reversed(rows.values())), None)
    base = summary["random_baseline_dimensions"]
    cells = ["Random", "-", num(summary["random_baseline"]), str(count or "-"), *["-"] * 5]
    lines.append("| " + " | ".join([*cells, *(num(base[d]) for d in DIMENSIONS), "-"]) + " |")
    for name, r in rows.items():
        lo, hi = r["overall_ci"]
        delta = r.get("delta_vs_previous")
        d_text = "-"
        if delta is not None:
            dlo, dhi = delta["overall_ci"]
            d_text = f"{delta['overall']:+.2f} [{dlo:+.2f}, {dhi:+.2f}] vs {delta['stage']}"
            paired = delta["interval"] == "paired"
            d_text += (
                f" (paired, {delta['discordance']:.2f}% discordant)" if paired else " (unpaired)"
            )
        cells = [name, _scored(name, r, rows), f"{num(r['overall'])} [{lo:.2f}, {hi:.2f}]"]
        cells += [str(r["count"]), num(r["exact_match"]), num(r["judgement"]["balanced"])]
        cells += [num(r["faithful"]), num(r["mean_dpa"]), num(r["valid_rate"])]
        cells += [*(num(r[d]) for d in DIMENSIONS), d_text]
        lines.append("| " + " | ".join(cells) + " |")
    sizes = ["| Stage | " + " | ".join(SIZES) + " | CoT states all four verdicts |"]
    sizes.append("|" + "---|" * (len(SIZES) + 2))
    for name, r in rows.items():
        cells = [num(r["answer_size"][k]) for k in SIZES] + [num(r["verdicts_stated"])]
        sizes.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [
        f"{k}: {r['hard_cases']} hard cases of {r['train_cases']}"
        for k, r in rows.items()
        if "hard_cases" in r
    ]
    return (
        "\n".join(lines)
        + ("\n\nMining: " + "; ".join(notes) if notes else "")
        + "\n\nAnswers naming N (none), 1-4 options, or invalid (% of answers):\n\n"
        + "\n".join(sizes)
        + "\n"
    )


def continued(markers: dict[Path, dict]) -> dict[str, str]:
    """stage -> the stage whose checkpoint it continued, from the stages' folders and stage.json
    (`init_ckpt`, set by a pipeline's continue_from: <stage>/checkpoints/last.ckpt)."""
    names = {f.resolve(): f.name for f in markers}
    found = {}
    for f, marker in markers.items():
        ckpt = marker.get("init_ckpt")
        if ckpt and (prefix := names.get(Path(ckpt).parent.parent.resolve())):
            found[f.name] = prefix
    return found


Series = list[tuple[str, list[float], list[float], list[float]]]  # stage, x, y, each y's epoch


def _chained(logs: list[tuple[str, Path]], key: str, x: str, continues: dict[str, str]) -> Series:
    """One series per stage, shifted so that each starts where the previous one ended. A stage
    that continued another's checkpoint logs on from that stage's restored step and epoch: it
    takes that stage's shift, so its curve follows on it rather than past its length again."""
    series, shifts, end = [], {}, 0.0
    for name, path in logs:
        shift = shifts[name] = shifts.get(continues.get(name), end)
        points = read_points(path, key, (x, "epoch"))
        if points:
            xs = [p[0] + shift for p in points]
            series.append((name, xs, [p[2] for p in points], [p[1] for p in points]))
            end = max(end, max(xs) + 1)
    return series


def _lines(series: Series) -> list[tuple[str, list[float], list[float]]]:
    return [(name, xs, ys) for name, xs, ys, _ in series]


def epoch_means(series: Series) -> list[tuple[str, list[float], list[float]]]:
    """Per stage, each epoch's mean value at the epoch's mean x: the trend a per-step reward's
    noise hides."""
    return [
        (name, list(per_epoch(epochs, xs).values()), list(per_epoch(epochs, ys).values()))
        for name, xs, ys, epochs in series
    ]


def switch_line(series: Series, configs: dict[str, dict]) -> tuple[str, float] | None:
    """Where GRPO's data schedule switches (`data.switch_epoch`: HCM's hard cases start there):
    the first x of that epoch in the first stage that trains past it on another composition
    than `all` (with `all`, nothing changes there)."""
    for name, xs, _, epochs in series:
        data = configs.get(name, {}).get("data") or {}
        switch, composition = data.get("switch_epoch"), data.get("composition", "all")
        after = [x for x, epoch in zip(xs, epochs, strict=True) if epoch >= (switch or 0)]
        if switch is not None and composition != "all" and after:
            return f"switch epoch {switch}: {composition}", min(after)
    return None


def curve_panels(folders: list[Path], baseline: float | None) -> list[Panel]:
    """SFT loss and GRPO reward and KL per step, the held-out score per epoch (all training
    stages, end to end), each from the stages' CSV logs."""
    logs = {f.name: f / "csv" / "metrics.csv" for f in folders}
    logs = {name: log for name, log in logs.items() if log_parts(log)}
    markers = {
        f: json.loads((f / "stage.json").read_text())
        for f in folders
        if (f / "stage.json").is_file()
    }
    kinds = {f.name: marker.get("kind") for f, marker in markers.items()}
    configs = {f.name: marker.get("config") or {} for f, marker in markers.items()}
    sft = [(n, p) for n, p in logs.items() if kinds.get(n) == "sft"]
    grpo = [(n, p) for n, p in logs.items() if kinds.get(n) == "grpo"]
    trained = [(n, p) for n, p in logs.items() if n in kinds]
    continues = continued(markers)
    hline = ("random", baseline) if baseline is not None else None
    reward = _chained(grpo, "train/reward/total", "step", continues)
    return [
        Panel(
            "SFT loss (train/loss)",
            "step, stage after stage",
            _lines(_chained(sft, "train/loss", "step", continues)),
        ),
        Panel(
            "GRPO reward (train/reward/total)",
            "step",
            _lines(reward),
            trends=epoch_means(reward),
            vline=switch_line(reward, configs),
        ),
        Panel("GRPO KL (train/kl)", "step", _lines(_chained(grpo, "train/kl", "step", continues))),
        Panel(
            "held-out score (val/score/overall)",
            "epoch, stage after stage",
            _lines(_chained(trained, "val/score/overall", "epoch", continues)),
            hline,
        ),
    ]


def write_summary(run_dir: Path, stage_names: list[str]) -> dict[str, Any]:
    """Print the table and write summary.json, summary.md and summary.png into `run_dir`."""
    run_dir = Path(run_dir)
    folders = [run_dir / "stages" / name for name in stage_names]
    scores = [s for f in folders if (s := read_stage(f)) is not None]
    if not scores:
        log.info("no stage holds a held-out score: no summary")
        return {}
    summary = summarize(scores)
    table = to_markdown(summary)
    print(f"\nSummary of {run_dir}\n\n{table}")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(run_dir / "summary.md", table)
    image = run_dir / "summary.png"
    image.unlink(missing_ok=True)  # an earlier run's figure would no longer match the table
    image = draw(curve_panels(folders, summary["random_baseline"]), image, run_dir.name)
    written = ", ".join(
        p.name for p in (run_dir / "summary.json", run_dir / "summary.md", image) if p
    )
    log.info("summary written to %s: %s", run_dir, written)
    return summary
