"""predictions.jsonl and its gallery: the page's rows, counts and filters, escaping of hostile
content, image paths kept inside the run and data folders, thumbnails written once, the W&B
table, a tiny evaluation's predictions, and the page in a real headless browser."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from hcm.gallery import (
    PAGE,
    THUMB_PX,
    ImageRefused,
    locate,
    log_table,
    main,
    write_gallery,
)
from hcm.predictions import write_predictions

REPO = Path(__file__).resolve().parents[1]
# a compact CoT calling A alone acceptable, and answering so
COT_A = (
    "<think>A: floor, shadow, acceptable. B: floating, unacceptable. C: floor, unacceptable. "
    "D: floor, no shadow, unacceptable.</think><answer>A</answer>"
)
HOSTILE = '</pre><script>alert("pwned")</script><img src=x onerror=alert(1)>'


class Page(HTMLParser):
    """The page's rows (attributes, image sources, texts) and its scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[dict] = []
        self.scripts, self.imgs, self.options = 0, [], []
        self._in, self._text = None, []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article":
            self.rows.append({**a, "imgs": [], "pre": ""})
        elif tag == "img":
            self.imgs.append(a)
            if self.rows:
                self.rows[-1]["imgs"].append(a["src"])
        elif tag == "script":
            self.scripts += 1
        elif tag in ("pre", "option", "span"):
            self._in, self._text = tag, []

    def handle_data(self, data):
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == self._in:
            text = "".join(self._text)
            if tag == "pre":
                self.rows[-1]["pre"] = text
            elif tag == "option":
                self.options.append(text)
            elif tag == "span" and text == "no image" and self.rows:
                self.rows[-1]["imgs"].append(None)
            self._in = None


def png(path: Path, colour: tuple[int, int, int], size: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture
def run(tmp_path):
    """A run folder with a predictions file whose images sit in a data root beside it:
    row 0 right, row 1 wrong with a hostile id and completion, row 2 wrong and hard with one
    image path escaping the allowed folders, row 3 with a symlink out of the data root.
    Rows 0 follows its CoT's verdicts, 2 and 3 do not, 1 states none (faithful null)."""
    data, folder = tmp_path / "data", tmp_path / "runs" / "r1" / "eval"
    secret = png(tmp_path / "private" / "secret.png", (255, 0, 255))
    images = [png(data / "s" / f"{k}.png", (40 * k, 100, 150)) for k in range(5)]
    (data / "s" / "link.png").symlink_to(secret)
    refs = [f"../../../data/s/{k}.png" for k in range(5)]
    rows = [
        {
            "id": "s0",
            "label": "AC",
            "dimensions": ["physical_shadow"],
            "correct": True,
            "parsed": "A",
            "dpa": 0.5,
            "completion": "<answer>A</answer>",
            "faithful": True,
            "hard": False,
        },
        {
            "id": '"><b>x</b>',
            "label": "B",
            "dimensions": ["physical_shadow", "placement_layout"],
            "correct": False,
            "parsed": None,
            "dpa": 0.0,
            "completion": HOSTILE,
            "faithful": None,
            "hard": False,
        },
        {
            "id": "s2",
            "label": "N",
            "dimensions": ["placement_layout"],
            "correct": False,
            "parsed": "D",
            "dpa": 0.0,
            "completion": "<answer>D</answer>",
            "faithful": False,
            "hard": True,
        },
        {
            "id": "s3",
            "label": "N",
            "dimensions": [],
            "correct": True,
            "parsed": "N",
            "dpa": 1.0,
            "completion": "<answer>N</answer>",
            "faithful": False,
            "hard": False,
        },
    ]
    for row in rows:
        row["images"] = list(refs)
    rows[2]["images"][4] = "../../../private/secret.png"  # escapes the run and data folders
    rows[3]["images"][0] = "../../../data/s/link.png"  # inside by name, outside by its target
    folder.mkdir(parents=True)
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(path=path, folder=folder, data=data, rows=rows, images=images)


def test_page_rows_counts_escaping_and_image_paths(run):
    page, rows, cells = write_gallery(run.path, roots=[run.data])
    text = page.read_text()
    p = Page(text)
    assert len(p.rows) == 4  # one per prediction
    assert [r["data-correct"] for r in p.rows] == ["1", "0", "0", "1"]
    assert [r["data-hard"] for r in p.rows] == ["0", "0", "1", "0"]
    assert [r["data-unfaithful"] for r in p.rows] == ["0", "0", "1", "1"]
    assert "unfaithful: <b id='n-unfaithful'>2</b> of the 3 completions" in text
    assert '<input type="checkbox" id="unfaithful">' in text
    assert text.count('<b class="bad">unfaithful</b>') == 2 and "follows its CoT" in text
    assert p.rows[1]["data-dims"] == "physical_shadow placement_layout"
    # the counts at the top, and the dimension filter's options with theirs
    assert "hard cases: <b id='n-hard'>1</b> of 4" in text
    assert re.search(r"<th>all</th><td>4</td><td>2</td><td>2</td><td>50.0%</td>", text)
    assert re.search(r"<th>placement_layout</th><td>2</td><td>0</td><td>2</td>", text)
    assert p.options == ["every dimension", "physical_shadow (2)", "placement_layout (2)"]
    # hostile text renders as text: one script (the page's own), the completion intact
    assert p.scripts == 1 and "alert" not in text.split("<script>")[1]
    assert p.rows[1]["pre"] == HOSTILE
    assert "&lt;script&gt;" in text and "<b>x</b>" not in text
    # the page's own script is the one its Content-Security-Policy allows, and no other
    script = text.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html.unescape(text.split("<title>")[0])
    # image paths: relative, inside thumbs/, resolving to small JPEGs of the right source
    assert [r["imgs"].count(None) for r in p.rows] == [0, 0, 1, 1]  # the two refused
    assert p.rows[2]["imgs"][4] is None and p.rows[3]["imgs"][0] is None
    for src in (s for r in p.rows for s in r["imgs"] if s):
        assert not src.startswith(("/", "file:")) and src.startswith("thumbs/")
        thumb = (run.folder / src).resolve()
        assert thumb.is_relative_to(run.folder.resolve())
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and max(im.size) == THUMB_PX
    with Image.open(run.folder / p.rows[0]["imgs"][2]) as im:  # candidate B = image 2
        assert im.convert("RGB").getpixel((48, 48)) == pytest.approx((80, 100, 150), abs=3)
    # nothing of the private image was copied: 5 distinct sources, 5 thumbnails
    assert len(list((run.folder / "thumbs").iterdir())) == 5
    assert cells[2][4] is None and len(rows) == 4


@pytest.mark.parametrize(
    ("ref", "ok"),
    [
        ("../../../data/s/0.png", True),
        ("thumbs/x.jpg", True),  # inside the run folder (need not exist yet)
        ("../../../private/secret.png", False),
        ("../../../data/s/link.png", False),  # a symlink out of the data root
        ("/etc/passwd", False),
        ("a\x00b", False),
        ("", False),
        (None, False),
    ],
)
def test_locate_keeps_paths_inside_the_run_and_data(run, ref, ok):
    roots = [run.folder, run.data]
    if ok:
        assert locate(run.folder, ref, roots).is_relative_to(run.folder.parents[2])
    else:
        with pytest.raises(ImageRefused):
            locate(run.folder, ref, roots)


def test_thumbnails_are_written_once_and_the_cli_finds_every_predictions_file(run, tmp_path):
    write_gallery(run.path, roots=[run.data])
    thumbs = sorted((run.folder / "thumbs").iterdir())
    stamps = [t.stat().st_mtime_ns for t in thumbs]
    second = run.folder.parent / "mining"
    second.mkdir()
    shutil.copy(run.path, second / "predictions.jsonl")
    pages = main([str(tmp_path / "runs"), "--data-root", str(run.data)])
    assert sorted(pages) == sorted([run.folder / PAGE, second / PAGE])
    assert [t.stat().st_mtime_ns for t in thumbs] == stamps  # reused, not rewritten
    assert len(Page((second / PAGE).read_text()).imgs) == 18  # 4 rows x 5, two refused
    # without the data root among the allowed folders, its images are refused, never read
    shutil.rmtree(second / "thumbs")
    main([str(second), "--data-root", str(tmp_path / "elsewhere")])
    assert len(Page((second / PAGE).read_text()).imgs) == 0
    assert not (second / "thumbs").exists()
    r = subprocess.run(
        [sys.executable, "-m", "hcm.gallery", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0 and "RUN_DIR" in r.stdout and "--data-root" in r.stdout


def test_in_memory_images_get_thumbnails_at_write_time(tmp_path):
    """A public benchmark's images live in parquet cells: their thumbnails are made when the
    predictions are written, inside the run folder."""
    buffers = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        b = io.BytesIO()
        Image.new("RGB", (300, 150), colour).save(b, "PNG")
        buffers.append(b.getvalue())
    record = SimpleNamespace(id="q0", images=tuple(buffers))
    row = {
        "id": "q0",
        "label": "B",
        "subtask": "count",
        "completion": "B",
        "parsed": "B",
        "correct": True,
    }
    path = write_predictions(tmp_path / "eval", [row], [record])
    saved = json.loads(path.read_text())
    assert saved["images"][0].startswith("thumbs/") and len(saved["images"]) == 2
    page, _, cells = write_gallery(path, roots=[])
    assert cells == [saved["images"]]  # used as they are
    with Image.open(tmp_path / "eval" / cells[0][1]) as im:
        assert im.size == (THUMB_PX, THUMB_PX // 2)
        assert im.convert("RGB").getpixel((10, 10)) == pytest.approx((0, 0, 255), abs=3)
    assert Page(page.read_text()).options == ["every dimension", "count (1)"]


def test_predictions_must_cover_every_sample(tmp_path):
    records = [SimpleNamespace(id=i, images=()) for i in ("a", "b")]
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        write_predictions(tmp_path, [{"id": "a"}], records)


def test_wandb_table_rows_and_thumbnails(run):
    import wandb

    _, rows, cells = write_gallery(run.path, roots=[run.data])
    logged = []

    class Logger:
        def log_table(self, key, columns, data):
            logged.append((key, columns, data))

    log_table([Logger(), object()], "test/predictions", rows, cells, run.folder)
    ((key, columns, data),) = logged
    assert key == "test/predictions"
    assert columns[:5] == ["original", "A", "B", "C", "D"]
    assert columns[5:] == [
        "id",
        "label",
        "dimensions",
        "completion",
        "parsed",
        "correct",
        "dpa",
        "faithful",
        "hard",
    ]
    assert len(data) == 4 and data[1][5 + 3] == HOSTILE and data[2][5 + 8] is True
    assert [row[5 + 7] for row in data] == [True, None, False, False]
    assert all(isinstance(c, wandb.Image) for c in data[0][:5])
    assert data[2][4] is None  # the refused image


# -- a tiny evaluation writes them ---------------------------------------------------------------
@pytest.mark.slow
def test_tiny_eval_writes_predictions_gallery_and_wandb_table(compose_cfg, monkeypatch, tmp_path):
    """evaluate() on the tiny model with logger=wandb (offline): predictions.jsonl holds one row
    per test sample, in the manifest's order, judged as the score counts; the gallery shows them
    and the offline W&B run holds the same table. Answers alternate between "A" and the model's
    own completion, so that both right and wrong verdicts occur."""
    from hcm.evaluate import evaluate
    from hcm.modules.base import ScreeningModule

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # offline staging
    real, given = ScreeningModule.answer, []

    def answer(self, batch, **kw):
        out = real(self, batch, **kw)
        texts = [t if i % 2 else COT_A for i, t in enumerate(out.texts)]
        given.extend(texts)
        return dataclasses.replace(out, texts=texts)

    monkeypatch.setattr(ScreeningModule, "answer", answer)
    cfg = compose_cfg("eval", ["experiment=tiny_eval", "logger=wandb"])
    results = evaluate(cfg)
    out, root = Path(cfg.paths.output_dir), Path(cfg.data.root)
    manifest = [json.loads(line) for line in (root / "test.jsonl").open()]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert [r["id"] for r in rows] == [m["id"] for m in manifest] and len(rows) == 16
    assert [r["label"] for r in rows] == [m["answer"] for m in manifest]
    assert [r["dimensions"] for r in rows] == [m["dimensions"] for m in manifest]
    assert [r["completion"] for r in rows] == given
    for r in rows[::2]:
        assert r["parsed"] == "A" and r["correct"] == ("A" in r["label"])
        assert r["dpa"] == (1 / len(r["label"]) if r["correct"] else 0.0)
        assert r["faithful"] is True  # its CoT called A alone acceptable
    assert 0 < sum(r["correct"] for r in rows) < 16
    score = 100 * sum(r["correct"] for r in rows) / len(rows)
    assert results["test/score/overall"] == pytest.approx(score)
    mean_dpa = 100 * sum(r["dpa"] for r in rows) / len(rows)
    assert results["test/score/mean_dpa"] == pytest.approx(mean_dpa)
    # judgement and faithfulness reach metrics.json, as the rows count them
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    stated = [r["faithful"] for r in rows if r["faithful"] is not None]
    assert saved["test/score/verdicts_stated"] == pytest.approx(100 * len(stated) / 16)
    assert saved["test/score/faithful"] == pytest.approx(100 * sum(stated) / len(stated))
    assert saved["test/score/answer_size/1"] >= 50  # every other answer is "A"
    assert 0 <= saved["test/score/judgement/balanced"] <= 100
    for r, m in zip(rows, manifest, strict=True):  # the images are the manifest's files
        wanted = [m["original"], *m["candidates"]]
        assert [(out / p).resolve() for p in r["images"]] == [(root / w).resolve() for w in wanted]
    page = Page((out / PAGE).read_text())
    assert [row["data-correct"] for row in page.rows] == [str(int(r["correct"])) for r in rows]
    assert all(len(row["imgs"]) == 5 and None not in row["imgs"] for row in page.rows)
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/test/predictions_*.json")
    saved = json.loads(table.read_text())
    assert saved["columns"][:6] == ["original", "A", "B", "C", "D", "id"]
    assert [d[5] for d in saved["data"]] == [r["id"] for r in rows]


@pytest.mark.slow
def test_public_benchmark_eval_predictions_have_in_memory_thumbnails(compose_cfg, tmp_path):
    """RealWorldQA's images live in parquet cells: evaluation writes their thumbnails into the
    run folder, and the rows carry the benchmark's subtask and options."""
    from test_benchmarks import write_realworldqa

    from hcm.evaluate import evaluate

    root = write_realworldqa(tmp_path / "rwqa")
    overrides = ["experiment=tiny_eval", "data=realworldqa", f"data.root={root}", "prompt=direct"]
    cfg = compose_cfg("eval", overrides)
    evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(rows) == 6 and all(len(r["images"]) == 1 for r in rows)
    assert rows[0]["options"] == ["Left", "Right", "Straight"] and "subtask" in rows[0]
    for r in rows:
        assert r["images"][0].startswith("thumbs/") and (out / r["images"][0]).is_file()
    page = Page((out / PAGE).read_text())
    assert [row["imgs"] for row in page.rows] == [r["images"] for r in rows]


# -- in a real browser ---------------------------------------------------------------------------
def browser() -> str | None:
    for name in ("chromium", "chromium-headless", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def headless(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}"]
    return subprocess.run(
        [exe, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(browser() is None, reason="no chromium on PATH (apt-get install chromium)")
def test_page_in_a_headless_browser(run, tmp_path):
    exe = browser()
    page, _, _ = write_gallery(run.path, roots=[run.data])
    shot = tmp_path / "shot.png"
    r = headless(exe, tmp_path, f"--screenshot={shot}", "--window-size=1000,800", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and thumbnails, not a blank page
    # the thumbnails' colours are on screen: candidate B's (80, 100, 150) among them
    assert any(abs(c[1][0] - 80) + abs(c[1][1] - 100) + abs(c[1][2] - 150) < 8 for c in colours)

    def rows_after_script(fragment: str) -> list[dict]:
        dom = headless(exe, tmp_path, "--dump-dom", page.as_uri() + fragment).stdout
        parsed = Page(dom)
        assert "samples match" in dom  # the script ran (the CSP let it)
        return parsed.rows

    everything = rows_after_script("")
    assert [("hidden" in r) for r in everything] == [False] * 4
    wrong = rows_after_script("#wrong=1")
    assert [("hidden" in r) for r in wrong] == [True, False, False, True]  # correct rows hidden
    hard = rows_after_script("#hard=1")
    assert [("hidden" in r) for r in hard] == [True, True, False, True]
    dim = rows_after_script("#dim=physical_shadow&wrong=1")
    assert [("hidden" in r) for r in dim] == [True, False, True, True]
    unfaithful = rows_after_script("#unfaithful=1")  # a null (no verdicts) is not unfaithful
    assert [("hidden" in r) for r in unfaithful] == [True, True, False, False]
    both = rows_after_script("#unfaithful=1&hard=1")
    assert [("hidden" in r) for r in both] == [True, True, False, True]
