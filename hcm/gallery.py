"""A static page per predictions file: the model's answers beside the images it saw.

`python -m hcm.gallery RUN_DIR` writes `gallery.html` beside every `predictions.jsonl` under
RUN_DIR (evaluation and mining also call it when they write one). The page opens from the file
system: no server, no network, CSS and script inline. Per sample it shows the original and the
candidates A-D as small lettered thumbnails, the label and dimensions, the completion with its
parsed answer, correct / DPA, whether the answer follows its CoT's verdicts (`faithful`,
hcm.judgement) and, for mining, whether the case is hard; at the top, summary counts and
filters (wrong only, a dimension, hard only, unfaithful only: answers that differ from what
their own CoT concluded). A URL hash sets the filters
(`gallery.html#wrong=1&dim=physical_shadow&hard=1&unfaithful=1&page=2`), so a filtered view
can be linked.
Thousands of samples stay usable: 50 rows a page, thumbnails loaded lazily.

Thumbnails (JPEG, at most THUMB_PX a side) are written once into `thumbs/` beside the page,
named after their source (path, size and mtime), and reused by the next call. Predictions may
be hostile: every text is HTML-escaped, a Content-Security-Policy lets only the page's own
script run, and an image path is used only when it resolves (symlinks followed) inside the
predictions' folder or a data root; any other is refused and shown as such.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hcm.files import atomic_write_bytes, atomic_write_text
from hcm.images import load_image
from hcm.screening import DIMENSIONS, OPTIONS

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
PAGE = "gallery.html"
THUMBS = "thumbs"
THUMB_PX = 96  # a thumbnail's longest side: five per row, thousands of rows
PAGE_SIZE = 50  # rows shown at a time
SCREENING_CAPTIONS = ("original", *OPTIONS)


class ImageRefused(ValueError):
    """An image path that is absolute, malformed, or resolves outside the allowed folders."""


def locate(folder: Path, ref: object, roots: Sequence[Path]) -> Path:
    """`ref` (relative to `folder`) resolved, if it stays inside one of `roots`."""
    if not isinstance(ref, str) or not ref or "\x00" in ref or os.path.isabs(ref):
        raise ImageRefused(f"not a relative path: {ref!r:.80}")
    try:
        path = (folder / ref).resolve()  # follows symlinks: a link out of the roots is caught
    except (OSError, RuntimeError, UnicodeError) as e:
        raise ImageRefused(f"{ref!r:.80} cannot be resolved ({e})") from None
    if not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise ImageRefused(f"{ref!r:.80} is outside {[str(r) for r in roots]}")
    return path


def save_thumbnail(image: Any, dest: Path) -> None:
    """A PIL image shrunk to THUMB_PX a side, written atomically as JPEG."""
    small = image.convert("RGB")
    small.thumbnail((THUMB_PX, THUMB_PX))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    atomic_write_bytes(dest, buffer.getvalue())


def thumbnail_of(source: Path, thumbs: Path) -> Path:
    """The thumbnail of an image file, made on first use; a source inside `thumbs` is one."""
    if source.is_relative_to(thumbs.resolve()):
        return source
    stat = source.stat()
    key = f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    dest = thumbs / (hashlib.sha256(key).hexdigest()[:24] + ".jpg")
    if not dest.is_file():
        save_thumbnail(load_image(source), dest)  # the safe decoder: format allow-list, size caps
    return dest


def thumbnails(rows: Sequence[dict], folder: Path, roots: Sequence[Path]) -> list[list[str | None]]:
    """Per row, per image: its thumbnail's path relative to `folder`, or None (refused or
    unreadable, with a warning)."""
    thumbs = folder / THUMBS
    out = []
    for row in rows:
        refs = row.get("images") or []
        cells: list[str | None] = []
        for ref in refs if isinstance(refs, list) else []:
            try:
                thumb = thumbnail_of(locate(folder, ref, [folder, *roots]), thumbs)
                cells.append(thumb.resolve().relative_to(folder.resolve()).as_posix())
            except (ValueError, OSError) as e:  # ImageRefused, ImageError, a missing file
                log.warning("gallery: sample %.80r: image %s", row.get("id"), e)
                cells.append(None)
        out.append(cells)
    return out


def groups(row: dict) -> list[str]:
    """What the dimension filter offers: the screening dimensions, or a benchmark's subtask."""
    dims = row.get("dimensions")
    if isinstance(dims, list):
        return [str(d) for d in dims]
    return [str(row["subtask"])] if row.get("subtask") else []


def summary(rows: Sequence[dict]) -> dict[str, Any]:
    """The counts at the top of the page."""
    n = len(rows)
    correct = sum(bool(r.get("correct")) for r in rows)
    per_group: dict[str, list[int]] = {}
    for r in rows:
        for g in groups(r):
            per_group.setdefault(g, [0, 0])
            per_group[g][0] += 1
            per_group[g][1] += bool(r.get("correct"))
    known = [d for d in DIMENSIONS if d in per_group]
    order = known + sorted(set(per_group) - set(known))
    out: dict[str, Any] = {
        "samples": n,
        "correct": correct,
        "wrong": n - correct,
        "groups": {g: {"samples": per_group[g][0], "correct": per_group[g][1]} for g in order},
    }
    if any("hard" in r for r in rows):
        out["hard"] = sum(bool(r.get("hard")) for r in rows)
    stated = [r["faithful"] for r in rows if isinstance(r.get("faithful"), bool)]
    if stated:  # completions whose CoT gave all four verdicts, and those the answer ignored
        out["stated"], out["unfaithful"] = len(stated), stated.count(False)
    dpa = [float(r["dpa"]) for r in rows if isinstance(r.get("dpa"), int | float)]
    if dpa:
        out["mean_dpa"] = sum(dpa) / len(dpa)
    return out


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "n/a"


def _row(i: int, row: dict, cells: Sequence[str | None]) -> str:
    correct, hard = bool(row.get("correct")), row.get("hard")
    captions = SCREENING_CAPTIONS if len(cells) == len(SCREENING_CAPTIONS) else range(1, 99)
    figures = []
    for caption, cell in zip(captions, cells, strict=False):
        img = (
            f'<img loading="lazy" src="{_e(cell)}" alt="{_e(caption)}">'
            if cell
            else '<span class="missing">no image</span>'
        )
        figures.append(f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>")
    facts = [f'<b class="{"ok" if correct else "bad"}">{"correct" if correct else "wrong"}</b>']
    facts.append(f"label <code>{_e(row.get('label'))}</code>")
    parsed = row.get("parsed")
    facts.append(f"parsed <code>{_e(parsed)}</code>" if parsed is not None else "invalid answer")
    if "dpa" in row:
        facts.append(f"DPA {float(row['dpa']):.2f}")
    faithful = row.get("faithful")
    if isinstance(faithful, bool):
        facts.append("follows its CoT" if faithful else '<b class="bad">unfaithful</b>')
    if hard is not None:
        facts.append('<b class="hard">hard</b>' if hard else "easy")
    if "pass_rate" in row:
        facts.append(f"pass rate {float(row['pass_rate']):.2f}")
    dims = " ".join(f'<span class="dim">{_e(g)}</span>' for g in groups(row))
    attrs = (
        f'data-correct="{int(correct)}" data-hard="{int(bool(hard))}" '
        f'data-unfaithful="{int(faithful is False)}" data-dims="{_e(" ".join(groups(row)))}"'
    )
    return (
        f'<article class="row" {attrs}>'
        f'<div class="head"><span class="n">#{i + 1}</span> <code class="id">{_e(row.get("id"))}'
        f"</code> {dims}</div>"
        f'<div class="imgs">{"".join(figures)}</div>'
        f'<div class="facts">{" · ".join(facts)}</div>'
        f'<pre class="completion">{_e(row.get("completion", ""))}</pre>'
        "</article>"
    )


STYLE = """
body{font:14px system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
h1{font-size:18px}.summary td,.summary th{padding:2px 10px;text-align:right}
.controls{position:sticky;top:0;background:#fafafa;padding:6px 0;border-bottom:1px solid #ccc}
.row{background:#fff;border:1px solid #ddd;margin:8px 0;padding:8px}
.row[hidden]{display:none}.imgs{display:flex;gap:6px}
figure{margin:0;text-align:center}figcaption{font-weight:bold}
img{width:96px;height:96px;object-fit:contain;background:#eee;border:1px solid #ccc}
.missing{display:inline-block;width:96px;height:96px;background:#eee;color:#999;font-size:11px}
.ok{color:#080}.bad{color:#b00}.hard{color:#a50}
.dim{background:#e6eefa;border-radius:3px;padding:0 4px;margin-left:4px;font-size:12px}
pre{white-space:pre-wrap;word-break:break-word;background:#f4f4f4;padding:6px;margin:6px 0 0}
"""

# Filters and pagination; the state lives in the URL hash so that a view can be linked.
SCRIPT = """
(function () {
  var rows = Array.prototype.slice.call(document.querySelectorAll("article.row"));
  var wrong = document.getElementById("wrong"), hard = document.getElementById("hard");
  var unfaithful = document.getElementById("unfaithful");
  var dim = document.getElementById("dim"), shown = document.getElementById("shown");
  var size = parseInt(document.querySelector("main").dataset.pageSize, 10), page = 1;
  function read() {
    var q = new URLSearchParams(location.hash.slice(1));
    wrong.checked = q.get("wrong") === "1";
    if (hard) hard.checked = q.get("hard") === "1";
    if (unfaithful) unfaithful.checked = q.get("unfaithful") === "1";
    dim.value = q.get("dim") || "";  // an unknown dimension selects none
    page = Math.max(1, parseInt(q.get("page") || "1", 10) || 1);
    apply();
  }
  function write() {
    var q = new URLSearchParams();
    if (wrong.checked) q.set("wrong", "1");
    if (hard && hard.checked) q.set("hard", "1");
    if (unfaithful && unfaithful.checked) q.set("unfaithful", "1");
    if (dim.value) q.set("dim", dim.value);
    if (page > 1) q.set("page", String(page));
    history.replaceState(null, "", "#" + q.toString());
    apply();
  }
  function keep(r) {
    if (wrong.checked && r.dataset.correct === "1") return false;
    if (hard && hard.checked && r.dataset.hard !== "1") return false;
    if (unfaithful && unfaithful.checked && r.dataset.unfaithful !== "1") return false;
    return !dim.value || r.dataset.dims.split(" ").indexOf(dim.value) >= 0;
  }
  function apply() {
    var match = rows.filter(keep);
    var pages = Math.max(1, Math.ceil(match.length / size));
    page = Math.min(page, pages);
    var on = new Set(match.slice((page - 1) * size, page * size));
    rows.forEach(function (r) { r.hidden = !on.has(r); });
    shown.textContent = match.length + " of " + rows.length + " samples match; page " +
      page + " of " + pages;
  }
  function filter() { page = 1; write(); }
  wrong.onchange = dim.onchange = filter;
  if (hard) hard.onchange = filter;
  if (unfaithful) unfaithful.onchange = filter;
  document.getElementById("prev").onclick = function () { page -= 1; write(); };
  document.getElementById("next").onclick = function () { page += 1; write(); };
  window.addEventListener("hashchange", read);
  read();
})();
"""


def render(rows: Sequence[dict], cells: Sequence[Sequence[str | None]], title: str) -> str:
    """The whole page: summary, controls, one <article> per row."""
    s = summary(rows)
    head = [("all", s["samples"], s["correct"])]
    head += [(g, c["samples"], c["correct"]) for g, c in s["groups"].items()]
    table = "".join(
        f"<tr><th>{_e(name)}</th><td>{n}</td><td>{k}</td><td>{n - k}</td><td>{_pct(k, n)}</td></tr>"
        for name, n, k in head
    )
    extra = []
    if "hard" in s:
        extra.append(f"hard cases: <b id='n-hard'>{s['hard']}</b> of {s['samples']}")
    if "mean_dpa" in s:
        extra.append(f"mean DPA: {s['mean_dpa']:.3f}")
    if "stated" in s:
        extra.append(
            f"unfaithful: <b id='n-unfaithful'>{s['unfaithful']}</b> of the {s['stated']} "
            "completions whose CoT states all four verdicts"
        )
    options = "".join(
        f'<option value="{_e(g)}">{_e(g)} ({c["samples"]})</option>' for g, c in s["groups"].items()
    )
    boxes = '<label><input type="checkbox" id="hard"> hard only</label>' if "hard" in s else ""
    if "stated" in s:
        boxes += ' <label><input type="checkbox" id="unfaithful"> unfaithful only</label>'
    script = SCRIPT
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (
        f"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'"
    )
    body = "".join(_row(i, row, c) for i, (row, c) in enumerate(zip(rows, cells, strict=True)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<title>{_e(title)}</title><style>{STYLE}</style></head><body>
<h1>{_e(title)}</h1>
<table class="summary">
<tr><th></th><th>samples</th><th>correct</th><th>wrong</th><th>score</th></tr>{table}</table>
<p>{" · ".join(extra)}</p>
<div class="controls"><label><input type="checkbox" id="wrong"> wrong only</label>
<select id="dim"><option value="">every dimension</option>{options}</select> {boxes}
<button id="prev">&larr;</button><button id="next">&rarr;</button> <span id="shown"></span></div>
<main data-page-size="{PAGE_SIZE}">{body}</main>
<script>{script}</script></body></html>
"""


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions file (a JSON object per line)."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            rows.append(row)
    return rows


def write_gallery(
    predictions: Path, roots: Sequence[Path] = ()
) -> tuple[Path, list[dict], list[list[str | None]]]:
    """`gallery.html` beside `predictions` (its images may come from `roots`, besides its own
    folder): (the page, the rows, their thumbnails relative to the page)."""
    predictions = Path(predictions)
    folder = predictions.parent
    rows = read_predictions(predictions)
    cells = thumbnails(rows, folder, roots)
    page = folder / PAGE
    title = "/".join(predictions.resolve().parts[-3:])  # e.g. stages/eval/predictions.jsonl
    atomic_write_text(page, render(rows, cells, title))
    log.info("gallery of %d predictions: %s", len(rows), page)
    return page, rows, cells


def log_table(loggers: Sequence[Any], key: str, rows: Sequence[dict], cells, folder: Path):
    """The same rows as a W&B Table with the thumbnails as `wandb.Image`s (loggers that have
    no `log_table`, like the CSV one, are skipped)."""
    loggers = [lg for lg in loggers if hasattr(lg, "log_table")]
    if not loggers:
        return
    import wandb  # optional heavy dependency: only runs with a W&B logger get here

    width = max((len(c) for c in cells), default=0)
    names = list(SCREENING_CAPTIONS) if width == len(SCREENING_CAPTIONS) else []
    names = names or [f"image_{k}" for k in range(width)]
    facts = ["id", "label", "dimensions", "completion", "parsed", "correct", "dpa", "faithful"]
    facts += ["hard"]
    facts = [f for f in facts if any(f in r for r in rows) or f == "dimensions"]
    data = []
    for row, row_cells in zip(rows, cells, strict=True):
        images = [wandb.Image(str(folder / c)) if c else None for c in row_cells]
        images += [None] * (width - len(images))
        values = [", ".join(groups(row)) if f == "dimensions" else row.get(f) for f in facts]
        data.append([*images, *values])
    for lg in loggers:
        lg.log_table(key=key, columns=[*names, *facts], data=data)


def find_predictions(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).rglob(PREDICTIONS))


def default_data_root() -> Path:
    """Where the configs keep data (conf/paths: `$HCM_ROOT/data`, else `./data`)."""
    return Path(os.environ.get("HCM_ROOT") or os.getcwd()) / "data"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m hcm.gallery",
        description="Write gallery.html beside every predictions.jsonl under RUN_DIR: the "
        "images, the label, the completion and its verdict per sample, with filters.",
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (searched recursively)")
    parser.add_argument(
        "--data-root",
        type=Path,
        action="append",
        help="a folder images may be read from besides RUN_DIR (repeatable; default: "
        "$HCM_ROOT/data, else ./data)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = find_predictions(args.run_dir)
    if not found:
        parser.error(f"no {PREDICTIONS} under {args.run_dir}")
    roots = [args.run_dir, *(args.data_root or [default_data_root()])]
    pages = [write_gallery(p, roots)[0] for p in found]
    for page in pages:
        print(page)
    return pages


if __name__ == "__main__":
    main()
