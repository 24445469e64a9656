"""Public benchmarks: readers on fixture files in the published schemas, answer extraction,
the paper's split, the accuracy metric, and a benchmark's batches through the tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hcm.benchmarks.accuracy import BenchmarkAccuracy
from hcm.benchmarks.readers import BLINK_SUBTASKS, read_blink, read_muirbench, read_realworldqa
from hcm.benchmarks.sources import SourceNotFoundError
from hcm.benchmarks.split import stratified_split
from hcm.choice import extract_choice, is_correct, normalize
from hcm.rewards import choice_reward

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MUIR_TASKS = ("Counting", "Ordering", "Scene_Understanding")
BLINK_FIXTURE_SUBTASKS = ("Art_Style", "Counting", "Jigsaw")
INSTRUCTION = "Please answer directly with only the letter of the correct option and nothing else."


def png(color: tuple[int, int, int], size: int = 24) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_realworldqa(root: Path, n: int = 12) -> Path:
    """RealWorldQA's `test` split as the hub stores it (data/test-*.parquet)."""
    rows = []
    for i in range(n):
        if i % 3 == 2:  # an open question with a number answer
            rows.append({"question": f"How many cars are there in scene {i}?", "answer": "2"})
        else:
            q = (
                f"Which way does the road turn in scene {i}?\nA. Left\nB. Right\nC. Straight\n"
                + INSTRUCTION
            )
            rows.append({"question": q, "answer": "ABC"[i % 3]})
        rows[-1]["image"] = png((10 * i, 100, 200))
    table = pa.table(
        {
            "image": pa.array([r["image"] for r in rows], IMAGE),
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
        }
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    return root


def write_muirbench(root: Path, per_task: int = 4) -> Path:
    """MuirBench's `test` split, as a `DatasetDict.save_to_disk` folder (Arrow IPC streams)."""
    rows = []
    for t, task in enumerate(MUIR_TASKS):
        for k in range(per_task):
            n_images = 2 + (k % 3)
            rows.append(
                {
                    "idx": f"{task}_{k}",
                    "task": task,
                    "question": "Which image shows the same object as <image>?",
                    "options": ["<image>"] * (n_images - 1) + ["None of them"],
                    "answer": "ABCD"[k % n_images],
                    "image_relation": "Similar",
                    "image_type": "Photo",
                    "counterpart_idx": None,
                    "image_list": [png((t * 60, k * 40, j * 50)) for j in range(n_images)],
                }
            )
    schema = pa.schema(
        [
            ("idx", pa.string()),
            ("task", pa.string()),
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("image_relation", pa.string()),
            ("image_type", pa.string()),
            ("counterpart_idx", pa.string()),
            ("image_list", pa.list_(IMAGE)),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    path = str(split / "data-00000-of-00001.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (split / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "test"})
    )
    (split / "dataset_info.json").write_text("{}")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    return root


def write_blink(root: Path, per_subtask: int = 4, subtasks=BLINK_FIXTURE_SUBTASKS) -> Path:
    """BLINK: one folder per subtask config holding val-*.parquet (and a test split, unlabelled)."""
    for s, subtask in enumerate(subtasks):
        rows = []
        for k in range(per_subtask):
            n_images = 1 + (k % 4)
            choices = ["the first image", "the second image"]
            row = {
                "idx": f"val_{subtask}_{k}",
                "question": f"Which image matches ({subtask})?",
                "sub_task": subtask,
                "choices": choices,
                "answer": f"({'AB'[k % 2]})",
                "prompt": f"Which image matches ({subtask})?\nSelect from the following "
                "choices.\n(A) the first image\n(B) the second image",
                "explanation": "",
            }
            for j in range(1, 5):
                row[f"image_{j}"] = png((s * 80, k * 50, j * 40)) if j <= n_images else None
            rows.append(row)
        fields = [
            ("idx", pa.string()),
            ("question", pa.string()),
            ("sub_task", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("prompt", pa.string()),
            ("explanation", pa.string()),
        ] + [(f"image_{j}", IMAGE) for j in range(1, 5)]
        table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
        (root / subtask).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / subtask / "val-00000-of-00001.parquet")
        hidden = table.set_column(4, "answer", pa.array([""] * len(rows)))
        pq.write_table(hidden, root / subtask / "test-00000-of-00001.parquet")
    return root


def write_all_fixtures(data_dir: Path) -> None:
    """The three benchmarks where conf/data/{realworldqa,muirbench,blink}.yaml look by default."""
    if not (data_dir / "RealWorldQA").exists():
        write_realworldqa(data_dir / "RealWorldQA")
    if not (data_dir / "MuirBench").exists():
        write_muirbench(data_dir / "MuirBench")
    if not (data_dir / "BLINK").exists():
        write_blink(data_dir / "BLINK", per_subtask=2, subtasks=BLINK_SUBTASKS)


# -- readers ---------------------------------------------------------------------------------------
def test_realworldqa_reader(tmp_path):
    records = read_realworldqa(write_realworldqa(tmp_path / "rwqa"))
    assert len(records) == 12 and len({r.id for r in records}) == 12
    first = records[0]
    assert first.answer == "A" and first.options == ("Left", "Right", "Straight")
    assert len(first.images) == 1 and Image.open(io.BytesIO(first.images[0])).size == (24, 24)
    assert records[2].answer == "2" and records[2].options == ()


def test_muirbench_reader_from_save_to_disk(tmp_path):
    records = read_muirbench(write_muirbench(tmp_path / "muir"))
    assert len(records) == 12
    r = records[1]  # 3 images: one in the question, one per image option
    assert r.subtask == "Counting" and len(r.images) == 3 and r.answer == "B"
    assert r.question.count("<image>") == 3
    assert r.question.splitlines()[1:] == ["A. <image>", "B. <image>", "C. None of them"]


def test_blink_reader_skips_missing_images_and_reads_val(tmp_path):
    records = read_blink(write_blink(tmp_path / "blink"), subtasks=BLINK_FIXTURE_SUBTASKS)
    assert len(records) == 12
    assert [len(r.images) for r in records[:4]] == [1, 2, 3, 4]
    assert {r.answer for r in records} == {"A", "B"} and records[0].subtask == "Art_Style"
    assert records[0].question.endswith("(B) the second image")


def test_missing_benchmark_names_the_folder_and_what_to_put_there(tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"no 'test' split under .*nowhere.*RealworldQA"):
        read_realworldqa(tmp_path / "nowhere")


# -- answers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", "B"),
        ("b.", "B"),
        ("(C)", "C"),
        ("C. Straight ahead", "C"),
        ("The answer is B", "B"),
        ("I think it turns Right", "B"),  # "I" is no option letter with three options
        ("A car turns, so B", None),  # two capital letters: ambiguous, like VLMEvalKit
        ("Right or Straight", None),
        ("", None),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response, ["Left", "Right", "Straight"]) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "correct"),
    [
        ("<think>the road bends</think><answer>B</answer>", "B", True),
        ("<think>the road bends</think>", "B", False),  # thought, never answered
        ("Two.", "2", True),  # RealWorldQA: number words to digits
        ("two cars", "2", False),
        ("Yes", "yes", True),
        ("(A)", "A", True),
        ("D", "A", False),
    ],
)
def test_is_correct_and_choice_reward(completion, answer, correct):
    assert is_correct(completion, answer) is correct
    assert choice_reward(completion, answer) == float(correct)


def test_normalize():
    assert normalize("  Three, maybe FOUR!") == "3 maybe 4"


# -- the split -------------------------------------------------------------------------------------
def test_split_is_one_to_one_per_subtask_seeded_and_order_free():
    ids = [f"q{i}" for i in range(40)]
    groups = ["a"] * 10 + ["b"] * 21 + ["c"] * 9
    split = stratified_split(ids, groups, 0.5, seed=3)
    assert sorted(split["train"] + split["test"]) == sorted(ids)
    assert not set(split["train"]) & set(split["test"])
    train_groups = [g for i, g in zip(ids, groups, strict=True) if i in split["train"]]
    assert [train_groups.count(g) for g in "abc"] == [5, 10, 4]
    again = stratified_split(ids[::-1], groups[::-1], 0.5, seed=3)
    assert sorted(again["train"]) == sorted(split["train"])
    assert stratified_split(ids, groups, 0.5, seed=4)["train"] != split["train"]


# -- the metric ------------------------------------------------------------------------------------
def test_accuracy_overall_and_per_subtask():
    metric = BenchmarkAccuracy(subtasks=["x", "y"])
    metric.update(
        ["A", "<answer>B</answer>", "C", "<think>hm"],
        ["A", "B", "A", "A"],
        [["l", "r", "s"]] * 4,
        ["x", "x", "y", "y"],
    )
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["overall"] == 50.0 and out["subtask/x"] == 100.0 and out["subtask/y"] == 0.0
    assert out["valid_rate"] == 75.0 and out["count"] == 4.0
    with pytest.raises(ValueError, match="unknown subtask"):
        metric.update(["A"], ["A"], [[]], ["z"])


# -- the datamodule on the tiny model --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["realworldqa", "muirbench", "blink"])
def test_datamodule_batches_through_the_tiny_model(benchmark, compose_cfg, tmp_path):
    from hydra.utils import instantiate

    writer = {"realworldqa": write_realworldqa, "muirbench": write_muirbench}
    root = writer.get(benchmark, write_blink)(tmp_path / benchmark)
    overrides = ["experiment=tiny_sft", f"data={benchmark}", "data.num_workers=0", "prompt=direct"]
    overrides += ["data.sft_sources=[direct]", "data.batch_size=4", f"data.root={root}"]
    if benchmark == "blink":
        overrides.append(f"data.subtasks=[{','.join(BLINK_FIXTURE_SUBTASKS)}]")
    cfg = compose_cfg("train", overrides)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    train, test = dm.load("train"), dm.load("test")
    assert len(train) + len(test) == 12 and len(train) == 6
    sft = next(iter(dm.train_dataloader()))
    assert sft["input_ids"].shape == sft["labels"].shape and len(sft["ids"]) == 4
    # labels on the answer only: decoding them gives the answer and the end of turn
    answer_ids = sft["labels"][0][sft["labels"][0] != -100]
    first = next(r for r in train if r.id == sft["ids"][0])
    decoded = dm.prompt_collate.builder.tokenizer.decode(answer_ids)
    assert decoded.startswith(cfg.data.prompts.direct.target.replace("{answer}", first.answer))
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"inputs", "ids", "answers", "options", "subtasks"}
    assert batch["answers"] == [r.answer for r in test[: len(batch["ids"])]]
    n_images = sum(len(r.images) for r in test[: len(batch["ids"])])
    image_id = dm.prompt_collate.builder.image_token_id
    tokens = int((batch["inputs"]["input_ids"] == image_id).sum())
    assert tokens == batch["inputs"]["pixel_values"].shape[0] * 4 and n_images <= tokens // 4
    split = json.loads(dm.manifest("train").read_text())
    assert split["ids"] == [r.id for r in train] and split["benchmark"] == benchmark
