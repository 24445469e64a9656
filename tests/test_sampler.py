"""The HCM-GRPO schedule: epoch compositions, determinism, DDP sharding, resume, errors."""

from collections import Counter

import pytest
import torch

from hcm.data.sampler import COMPOSITIONS, HardCaseSampler, epoch_indices, random_extras, shard

N, HARD, SWITCH = 10, [1, 4, 7], 3
EASY = [0, 2, 3, 5, 6, 8, 9]


def after_switch(composition, seed=0, epoch=SWITCH, n=N, hard=HARD):
    return epoch_indices(n, hard, epoch, SWITCH, composition, seed)


@pytest.mark.parametrize(
    ("composition", "expected_counts"),
    [
        ("all", Counter(range(10))),
        ("hard_only", Counter(HARD)),
        ("easy_only", Counter(EASY)),
        ("all_plus_hard", Counter(range(10)) + Counter(HARD)),
    ],
)
def test_composition_is_the_expected_multiset(composition, expected_counts):
    order = after_switch(composition)
    assert Counter(order) == expected_counts
    assert (
        len(order) == {"all": 10, "hard_only": 3, "easy_only": 7, "all_plus_hard": 13}[composition]
    )


def test_all_plus_hard_repeats_each_hard_case_exactly_twice():
    counts = Counter(after_switch("all_plus_hard"))
    assert {i: counts[i] for i in range(N)} == {i: 2 if i in HARD else 1 for i in range(N)}


def test_all_plus_random_adds_len_hard_distinct_random_indices():
    for seed in range(20):
        order = after_switch("all_plus_random", seed=seed)
        assert len(order) == 13
        extras = Counter(order) - Counter(range(N))
        assert sum(extras.values()) == 3 and max(extras.values()) == 1  # without replacement
        assert set(extras) <= set(range(N))
        assert sorted(extras) == random_extras(N, 3, seed)


def test_random_only_is_as_many_random_samples_as_hard_cases():
    """hard_only's control at equal steps: the same count, drawn at random (the set
    all_plus_random adds), once per run."""
    for seed in range(5):
        order = after_switch("random_only", seed=seed)
        assert sorted(order) == random_extras(N, len(HARD), seed)
        assert len(order) == len(after_switch("hard_only", seed=seed))


def test_random_extras_fixed_for_the_run_and_vary_with_seed():
    # One control set for all post-switch epochs (like the hard set), another for another seed.
    extras = [Counter(after_switch("all_plus_random", epoch=e)) - Counter(range(N)) for e in (3, 4)]
    assert extras[0] == extras[1]
    draws = {tuple(random_extras(100, 10, s)) for s in range(5)}
    assert len(draws) == 5


def test_epochs_before_switch_are_permutations_shared_by_all_arms():
    for epoch in range(SWITCH):
        orders = [epoch_indices(N, HARD, epoch, SWITCH, c, seed=5) for c in COMPOSITIONS]
        assert sorted(orders[0]) == list(range(N))
        assert all(o == orders[0] for o in orders)  # arms differ only from the switch on


def test_switch_epoch_zero_applies_composition_from_the_first_epoch():
    assert sorted(epoch_indices(N, HARD, 0, 0, "hard_only", seed=0)) == HARD


def test_order_reproducible_and_changes_across_epochs_and_seeds():
    n = 50
    a = epoch_indices(n, [3], 1, 2, "all", seed=7)
    assert a == epoch_indices(n, [3], 1, 2, "all", seed=7)
    assert a != epoch_indices(n, [3], 2, 2, "all", seed=7)
    assert a != epoch_indices(n, [3], 1, 2, "all", seed=8)
    assert a != list(range(n))  # shuffled, not the identity


def test_no_global_rng_state_used_or_changed():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = epoch_indices(20, [1], 4, 3, "all_plus_random", seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    assert epoch_indices(20, [1], 4, 3, "all_plus_random", seed=1) == a


def test_shard_layout_matches_the_drawn_example():
    order = [10, 11, 12, 13, 14]
    assert shard(order, 2, 0, drop_last=False) == [10, 12, 14]
    assert shard(order, 2, 1, drop_last=False) == [11, 13, 10]
    assert shard(order, 2, 0, drop_last=True) == [10, 12]
    assert shard(order, 2, 1, drop_last=True) == [11, 13]
    # padding longer than the order cycles it, as torch's DistributedSampler does
    assert [shard([7, 8], 5, r, drop_last=False) for r in range(5)] == [[7], [8], [7], [8], [7]]


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize(("replicas", "drop_last"), [(3, False), (3, True), (4, False), (1, False)])
def test_ddp_shards_are_disjoint_positions_covering_the_epoch(composition, replicas, drop_last):
    epoch = SWITCH  # post-switch lengths 10, 3, 7, 13, 13 exercise padding and cutting
    order = after_switch(composition, seed=2)
    samplers = [
        HardCaseSampler(N, HARD, SWITCH, composition, 2, replicas, r, drop_last)
        for r in range(replicas)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    shards = [list(s) for s in samplers]
    per_rank = len(order) // replicas if drop_last else -(-len(order) // replicas)
    assert [len(x) for x in shards] == [per_rank] * replicas == [len(s) for s in samplers]
    # interleave back by position: position p of rank r is global position p*replicas + r
    rebuilt = [shards[p % replicas][p // replicas] for p in range(per_rank * replicas)]
    padded = (order * 2)[: per_rank * replicas]
    assert rebuilt == padded


def test_len_changes_at_the_switch():
    s = HardCaseSampler(N, HARD, SWITCH, "all_plus_hard", num_replicas=2, rank=1)
    lengths = []
    for epoch in range(5):
        s.set_epoch(epoch)
        lengths.append((len(s), len(list(s))))
    assert lengths == [(5, 5)] * 3 + [(7, 7)] * 2
    assert [s.epoch_length(e) for e in range(5)] == [5, 5, 5, 7, 7]


def test_sampler_yields_epoch_indices_order():
    s = HardCaseSampler(N, HARD, SWITCH, "easy_only", seed=9)
    s.set_epoch(4)
    assert list(s) == epoch_indices(N, HARD, 4, SWITCH, "easy_only", 9)


def test_set_start_skips_the_consumed_head_and_keeps_len():
    s = HardCaseSampler(N, HARD, SWITCH, "all_plus_random", seed=3, num_replicas=2, rank=0)
    s.set_epoch(3)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:]
    assert len(s) == len(full) == 7
    s.set_epoch(3)  # a trainer re-announcing the resumed epoch keeps the offset
    assert list(s) == full[4:]
    s.set_epoch(4)  # a new epoch starts from its beginning
    assert len(list(s)) == 7


def test_set_start_resume_reproduces_the_tail_exactly():
    def make():
        return HardCaseSampler(N, HARD, SWITCH, "all_plus_hard", seed=11, num_replicas=2, rank=1)

    run = make()
    run.set_epoch(3)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    tail = list(it)

    resumed = make()  # as the datamodule resumes from a checkpoint's (epoch, consumed)
    resumed.set_epoch(3)
    resumed.set_start(3)
    resumed.set_epoch(3)  # Lightning calls this after the checkpoint is restored
    assert list(resumed) == tail
    assert head + tail == run.rank_indices()
    with pytest.raises(ValueError, match="consumed"):
        resumed.set_start(len(resumed) + 1)


def test_an_offset_counts_this_ranks_indices():
    r0 = HardCaseSampler(N, HARD, SWITCH, "all", num_replicas=2, rank=0)
    r1 = HardCaseSampler(N, HARD, SWITCH, "all", num_replicas=2, rank=1)
    r0.set_epoch(1)
    r1.set_epoch(1)
    r1_full = list(r1)
    assert r1_full != list(r0)
    r1.set_start(2)
    assert list(r1) == r1_full[2:]


def test_all_plus_hard_with_no_hard_cases_is_all():
    assert sorted(epoch_indices(N, [], 3, 3, "all_plus_hard", 0)) == list(range(N))
    assert sorted(epoch_indices(N, [], 3, 3, "all_plus_random", 0)) == list(range(N))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"composition": "hard"}, "unknown composition.*random_only"),
        ({"hard": [1, 10]}, r"out of range \[0, 10\): \[10\]"),
        ({"hard": [-1]}, "out of range"),
        ({"hard": [1, 4, 1]}, r"repeated: \[1\]"),
        ({"hard": [1.0]}, "must be ints"),
        ({"switch_epoch": -1}, "switch_epoch"),
        ({"hard": [], "composition": "hard_only"}, "hard_only.*empty"),
        ({"hard": [], "composition": "random_only"}, "random_only.*empty"),
        ({"hard": list(range(10)), "composition": "easy_only"}, "every sample is hard"),
        ({"n": 0}, "positive"),
        ({"epoch": -1}, "epoch"),
        ({"seed": -1}, "seed"),
    ],
)
def test_epoch_indices_errors(kwargs, match):
    args = {"n": N, "hard": HARD, "epoch": 3, "switch_epoch": SWITCH, "composition": "all"}
    with pytest.raises(ValueError, match=match):
        epoch_indices(**{**args, "seed": 0, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"composition": "nope"}, "unknown composition"),
        ({"hard_indices": [], "composition": "hard_only"}, "empty"),
        ({"rank": 2, "num_replicas": 2}, "rank"),
        ({"num_replicas": 0}, "num_replicas"),
        # 3 hard cases on 4 ranks with drop_last: the post-switch epoch would be empty
        ({"composition": "hard_only", "num_replicas": 4, "drop_last": True}, "after the switch"),
    ],
)
def test_sampler_constructor_errors(kwargs, match):
    args = {"n": N, "hard_indices": HARD, "switch_epoch": SWITCH, "composition": "all"}
    with pytest.raises(ValueError, match=match):
        HardCaseSampler(**{**args, **kwargs})


def test_set_start_out_of_range():
    s = HardCaseSampler(N, HARD, SWITCH, "all")
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        s.set_start(11)


def test_works_in_a_dataloader():
    s = HardCaseSampler(N, HARD, SWITCH, "hard_only")
    s.set_epoch(3)
    loader = torch.utils.data.DataLoader(list(range(100, 110)), batch_size=2, sampler=s)
    got = sorted(torch.cat(list(loader)).tolist())
    assert got == [101, 104, 107]
