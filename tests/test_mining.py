"""Hard-case mining: wrong answers are hard, k samples with a pass-rate threshold, the cache
(written, reused, stale on model / manifest / parameters), the progress bar, and no image
tokens generated while mining with the real tiny model."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import hcm.data.datamodule as datamodule
import hcm.model.generation as generation
from hcm.data.hard_cases import HardCaseSet
from hcm.data.sampler import EvalSampler
from hcm.mining import Mining, mine, model_fingerprint
from hcm.model.generation import banned_token_ids
from hcm.screening_score import ScreeningScore

FAST = [
    "experiment=tiny_grpo",
    "data.composition=all_plus_hard",
    "prompt.user='Original <image> Generated <image> Answer:'",
    "model.max_patches=1",
]
N_TRAIN = 24  # conf/data/synthetic_tiny.yaml


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on shared cores: intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def attached(compose_cfg, tmp_path):
    """(module attached to a single-process Trainer, datamodule set up for fitting)."""
    cfg = compose_cfg("train", FAST)
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    module = instantiate(cfg.module, _convert_="all")
    module.configure_model()
    module.trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path
    )
    dm.trainer = module.trainer
    return module, dm


def mine_hard_cases(module, dm, **mining) -> list[int]:
    """What GRPOModule.on_fit_start does: the datamodule mines with the module's policy, under
    the rule `module.mining` with `mining` changed; the hard set it now holds."""
    rule = Mining(**{**module.mining, **mining})
    budget = module.eval_generation["max_new_tokens"]
    dm.mine_hard_cases(module.mining_answer(rule), rule, str(module.model_path), budget)
    return dm.hard_indices


def wrong(answer: str) -> str:
    return "<answer>A</answer>" if answer == "N" else "<answer>N</answer>"


def cot(answer: str) -> str:
    """A compact CoT whose verdicts conclude `answer`, then the answer: a faithful completion."""
    think = " ".join(f"{k}: {'' if k in answer else 'un'}acceptable." for k in "ABCD")
    return f"<think>{think}</think><answer>{answer}</answer>"


class Answers:
    """Stands in for module.answer: case i's s-th answer is right iff right(i, s) (a faithful
    CoT, else a bare wrong answer)."""

    def __init__(self, dm, right):
        self.position = {r.id: i for i, r in enumerate(dm.load("train"))}
        self.right, self.calls = right, []

    def __call__(self, batch, **kwargs):
        self.calls.append(kwargs)
        k = kwargs.get("group_size", 1)
        texts = [
            cot(a) if self.right(self.position[i], s) else wrong(a)
            for i, a in zip(batch["ids"], batch["answers"], strict=True)
            for s in range(k)
        ]
        return SimpleNamespace(texts=texts, truncated=torch.zeros(len(texts), dtype=torch.bool))


def test_wrong_answers_are_the_hard_cases_and_the_cache_is_reused(attached, tmp_path, monkeypatch):
    module, dm = attached
    hard = {1, 4, 7, 20}
    answers = Answers(dm, lambda i, s: i not in hard)
    monkeypatch.setattr(module, "answer", answers)
    cache = tmp_path / "hard.json"
    assert mine_hard_cases(module, dm, cache_path=str(cache), batch_size=8) == sorted(hard)
    assert len(answers.calls) == 3  # 24 cases, 8 per batch
    assert answers.calls[0]["do_sample"] is False and "group_size" not in answers.calls[0]
    ids = [r.id for r in dm.load("train")]
    saved = HardCaseSet.load(cache)
    assert saved.hard_ids == tuple(ids[i] for i in sorted(hard))
    assert len(saved.easy_ids) == N_TRAIN - len(hard)
    assert saved.model == str(module.model_path)
    assert saved.params["greedy"] is True and saved.params["k"] == 1

    def never(batch, **kwargs):
        raise AssertionError("a matching cache must not be mined again")

    monkeypatch.setattr(module, "answer", never)
    assert mine_hard_cases(module, dm, cache_path=str(cache), batch_size=8) == sorted(hard)


@pytest.mark.parametrize(
    "change",
    ["fingerprint", "manifest", "params", "prompt", "chat_template", "precision", "seed"],
)
def test_a_stale_cache_is_mined_again(attached, tmp_path, monkeypatch, change):
    """A cache file may be shared by jobs of other configs (module.mining.cache_path): any
    change in what decides the hard set makes it stale."""
    module, dm = attached
    cache = tmp_path / "hard.json"
    rule = {"k": 2} if change == "seed" else {}  # the seed decides only sampled answers
    monkeypatch.setattr(module, "answer", Answers(dm, lambda i, s: i != 0))
    assert mine_hard_cases(module, dm, cache_path=str(cache), **rule) == [0]

    if change == "fingerprint":  # the weights changed
        monkeypatch.setattr(datamodule, "model_fingerprint", lambda path, cache: "0" * 64)
    elif change == "manifest":
        monkeypatch.setattr(datamodule, "manifest_hash", lambda path: "f" * 64)
    elif change == "params":  # the completion budget
        module.eval_generation["max_new_tokens"] = 7
    elif change == "prompt":  # same prompt name, other text
        monkeypatch.setattr(dm, "prompt", replace(dm.prompt, user=dm.prompt.user + " Think."))
    elif change == "chat_template":  # the same model weights, another template around the prompt
        tokenizer = dm.prompt_collate.builder.tokenizer
        monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template + "{# v2 #}")
    elif change == "precision":  # bf16 autocast decodes other greedy answers
        dm.trainer = L.Trainer(
            accelerator="cpu", devices=1, logger=False, precision="bf16-mixed",
            default_root_dir=tmp_path,
        )  # fmt: skip
    else:
        dm.seed += 1
    again = Answers(dm, lambda i, s: i != 5)
    monkeypatch.setattr(module, "answer", again)
    assert mine_hard_cases(module, dm, cache_path=str(cache), **rule) == [5]
    assert again.calls
    assert HardCaseSet.load(cache).hard_ids == (dm.load("train")[5].id,)


def test_k_samples_with_a_pass_rate_threshold(attached, tmp_path, monkeypatch):
    module, dm = attached
    # case i gets (i % 5) of its 4 answers right (4 when i % 5 == 4)
    answers = Answers(dm, lambda i, s: s < i % 5)
    monkeypatch.setattr(module, "answer", answers)
    hard = mine_hard_cases(
        module, dm, cache_path=str(tmp_path / "h.json"), k=4, pass_threshold=0.5, temperature=0.7
    )
    assert hard == [i for i in range(N_TRAIN) if i % 5 < 2]  # pass rate 0 or 1/4 < 0.5
    assert all(
        c["group_size"] == 4 and c["do_sample"] and c["temperature"] == 0.7 for c in answers.calls
    )
    strict = mine_hard_cases(
        module, dm, cache_path=str(tmp_path / "h1.json"), k=4, pass_threshold=1.0
    )
    assert strict == [i for i in range(N_TRAIN) if i % 5 != 4]  # one wrong answer: hard


def test_progress_bar(attached, tmp_path, monkeypatch, capsys):
    module, dm = attached
    monkeypatch.setattr(module, "answer", Answers(dm, lambda i, s: True))
    assert mine_hard_cases(module, dm, cache_path=str(tmp_path / "h.json"), batch_size=10) == []
    err = capsys.readouterr().err
    assert "mining hard cases" in err and "3/3" in err


@pytest.mark.parametrize(
    ("k", "pass_threshold", "correct", "hard"),
    [
        (1, 1.0, "metric", ["c2"]),  # "A" for "AC" is right by the metric
        (1, 1.0, "exact", ["c1", "c2"]),  # ... and wrong when the whole set is needed
        (2, 1.0, "metric", ["c0", "c2"]),  # one wrong answer of two: hard
        (2, 0.5, "metric", ["c2"]),  # half right is enough
    ],
)
def test_mine_is_a_function_of_the_answers_the_cases_and_the_rule(k, pass_threshold, correct, hard):
    """No Lightning, no model: a stub answers (case-major, k per case) and the rule decides."""
    answers = {  # case -> its k answers
        "c0": ["<answer>B</answer>", "<answer>N</answer>"],
        "c1": ["<answer>A</answer>", "<answer>A</answer>"],
        "c2": ["<answer>D</answer>", "<answer>N</answer>"],
    }
    labels = {"c0": "B", "c1": "AC", "c2": "B"}
    cut = {"c0": False, "c1": False, "c2": True}

    def answer(batch):
        texts = [t for case in batch["ids"] for t in answers[case][:k]]
        flags = [cut[case] for case in batch["ids"] for _ in range(k)]
        return SimpleNamespace(texts=texts, truncated=torch.tensor(flags))

    ids = list(labels)
    batches = [
        {"ids": part, "answers": [labels[c] for c in part], "dimensions": [[] for _ in part]}
        for part in (ids[:2], ids[2:])
    ]
    rule = Mining(None, k, pass_threshold, 1.0, correct, None)
    mined = mine(answer, batches, ids, ScreeningScore(), rule)
    assert mined.hard_ids == hard and sorted(mined.hard_ids + mined.easy_ids) == ids
    assert mined.right.shape == mined.truncated.shape == (3, k)
    assert mined.truncated[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert [v["id"] for v in mined.verdicts] == ids  # each case's first answer, judged


def test_mining_shards_pad_to_equal_batches_and_judge_each_case_once():
    """The paper's 1,044 training cases on 5 ranks in batches of 8: split round-robin, ranks
    0-3 would answer 27 batches and rank 4 26 (one generate call short: a hang under FSDP).
    Padded as evaluation pads, every rank answers 27, and the repeats are judged on no rank."""
    n, world, size = 1044, 5, 8
    ids = [f"c{i}" for i in range(n)]
    plans = [EvalSampler(ids, rank, world).batches(size) for rank in range(world)]
    assert [len(plan) for plan in plans] == [27] * world

    def answer(batch):  # every answer right: each judged case adds 1 to its count
        rows = len(batch["ids"])
        return SimpleNamespace(texts=["<answer>B</answer>"] * rows, truncated=torch.zeros(rows))

    rule = Mining(None, 1, 1.0, 1.0, "metric", None)
    judged = torch.zeros(n)
    for plan in plans:  # each rank mines its shard
        batches = [
            {"ids": [ids[i] for i in rows], "answers": ["B"] * len(rows),
             "dimensions": [[] for _ in rows], "scored": scored}
            for rows, scored in plan
        ]  # fmt: skip
        judged += mine(answer, batches, ids, ScreeningScore(), rule).right[:, 0]
    assert judged.tolist() == [1.0] * n


def test_model_fingerprint(tmp_path):
    model, hashes = tmp_path / "model", tmp_path / "hashes.json"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = bytearray(3 << 20)  # 3 MiB: a change after the first MiB must count too
    (model / "model.safetensors").write_bytes(weights)
    first = model_fingerprint(model, hashes)
    (model / "README.md").write_text("not a weight")
    assert model_fingerprint(model, hashes) == first
    weights[(2 << 20) + 5] = 1  # same size, same first MiB
    (model / "model.safetensors").write_bytes(weights)
    assert model_fingerprint(model, hashes) != first
    assert model_fingerprint("OpenGVLab/InternVL3-1B-hf") != model_fingerprint("other/model")


@pytest.mark.parametrize("k", [1, 2])
def test_mining_the_real_tiny_model_never_generates_image_tokens(
    attached, tmp_path, monkeypatch, k
):
    module, dm = attached
    banned = banned_token_ids(module.tokenizer)
    old = module.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():  # the model now prefers every banned token to any other
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[banned] = 30.0
    module.model.lm_head = head
    batch = dm.prompt_collate([dm.train_dataset[0]])
    with torch.no_grad():
        first = module.model(**batch["inputs"]).logits[0, -1].argmax().item()
    assert first in banned  # unmasked, generation would start with an image or chat token
    generated = []
    real = generation.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        generated.append(out.completion_ids[out.completion_mask.bool()])
        return out

    monkeypatch.setattr(generation, "generate", spy)
    module.eval_generation["max_new_tokens"] = 6
    hard = mine_hard_cases(module, dm, cache_path=str(tmp_path / "h.json"), k=k, batch_size=12)
    assert len(generated) == 2  # 24 cases, 12 per batch
    tokens = torch.cat(generated)
    assert tokens.numel() >= N_TRAIN * k  # at least one token per answer
    assert not set(tokens.tolist()) & set(banned)
    saved = HardCaseSet.load(tmp_path / "h.json")
    assert len(saved.hard_ids) + len(saved.easy_ids) == N_TRAIN == len(dm.load("train"))
    assert hard == saved.indices([r.id for r in dm.load("train")])


def test_mining_writes_predictions_with_hard_and_a_gallery(attached, tmp_path, monkeypatch):
    """Beside the cache: each case's first answer, its verdict, pass rate and hard flag, in the
    train split's order, and the gallery page counting the hard cases."""
    import json

    from hcm.gallery import PAGE

    module, dm = attached
    # case i gets (i % 3) of its 2 answers right: pass rates 0, 1/2, 1 (threshold 1: hard < 1)
    monkeypatch.setattr(module, "answer", Answers(dm, lambda i, s: s < i % 3))
    cache = tmp_path / "hard_cases.json"
    hard = mine_hard_cases(module, dm, cache_path=str(cache), k=2)
    assert hard == [i for i in range(N_TRAIN) if i % 3 < 2]
    rows = [json.loads(line) for line in (tmp_path / "hard_cases" / "predictions.jsonl").open()]
    records = dm.load("train")
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["hard"] for r in rows] == [i % 3 < 2 for i in range(N_TRAIN)]
    assert [r["pass_rate"] for r in rows] == [(i % 3) / 2 for i in range(N_TRAIN)]
    assert [r["correct"] for r in rows] == [i % 3 > 0 for i in range(N_TRAIN)]  # the first answer
    # a right answer follows its CoT; a bare wrong one states no verdicts (null)
    assert [r["faithful"] for r in rows] == [True if i % 3 else None for i in range(N_TRAIN)]
    assert [r["label"] for r in rows] == [r.answer for r in records]
    assert rows[1]["parsed"] == records[1].answer and rows[1]["dpa"] == 1.0
    assert len(rows[0]["images"]) == 5
    page = (tmp_path / "hard_cases" / PAGE).read_text()
    assert page.count('<article class="row"') == N_TRAIN
    assert f"hard cases: <b id='n-hard'>{len(hard)}</b> of {N_TRAIN}" in page
    assert page.count('data-hard="1"') == len(hard)


@pytest.mark.parametrize("correct", ["metric", "exact"])
def test_naming_part_of_the_answer_is_easy_by_the_metric_and_hard_when_exact(
    attached, tmp_path, monkeypatch, correct
):
    module, dm = attached
    records = dm.load("train")
    several = [i for i, r in enumerate(records) if len(r.answer) > 1]  # e.g. "AC"
    assert several and len(several) < N_TRAIN

    def first_option(batch, **kwargs):  # "A" for "AC", the whole answer otherwise
        texts = [f"<think>x</think><answer>{a[0]}</answer>" for a in batch["answers"]]
        return SimpleNamespace(texts=texts, truncated=torch.zeros(len(texts), dtype=torch.bool))

    monkeypatch.setattr(module, "answer", first_option)
    cache = tmp_path / "hard.json"
    hard = mine_hard_cases(module, dm, cache_path=str(cache), correct=correct)
    assert hard == (several if correct == "exact" else [])
    assert HardCaseSet.load(cache).params["correct"] == correct  # part of the cache key


def test_mining_logs_the_fraction_cut_by_the_budget(attached, tmp_path, monkeypatch, caplog):
    module, dm = attached

    def every_third_cut(batch, **kwargs):
        texts = [f"<answer>{a}</answer>" for a in batch["answers"]]
        cut = torch.tensor([position[i] % 3 == 0 for i in batch["ids"]])
        return SimpleNamespace(texts=texts, truncated=cut)

    position = {r.id: n for n, r in enumerate(dm.load("train"))}
    monkeypatch.setattr(module, "answer", every_third_cut)
    expected = 8 / N_TRAIN  # cases 0, 3, ..., 21
    with caplog.at_level("INFO", logger="hcm.mining"):
        mine_hard_cases(module, dm, cache_path=str(tmp_path / "h.json"))
    assert f"mining: {100 * expected:.1f}% of the answers ran into max_new_tokens" in caplog.text
