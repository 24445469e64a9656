"""The HCM-GRPO data schedule: which training samples each epoch of Stage 2 sees, in which order.

Paper, section 4.2 and Table 7: GRPO trains `switch_epoch` (3) epochs on the full training set, then
the remaining epochs (2) on one of five compositions of it, where hard cases are the samples the
SFT model answered wrongly (see `hcm.data.hard_cases`) and easy cases the rest:

    all              every sample once (plain DPA-GRPO)
    hard_only        the hard cases only
    easy_only        the easy cases only
    all_plus_hard    every sample, plus the hard cases again (HCM-GRPO)
    all_plus_random  every sample, plus len(hard) samples drawn at random (the control arm)
    random_only      len(hard) samples drawn at random: hard_only's control at equal steps (ours,
                     not the paper's), so that "fewer steps" and "which steps" can be told apart

`epoch_indices` is the pure index logic; `HardCaseSampler` wraps it for a DataLoader, shards it
across DDP ranks and can resume mid-epoch (`set_start`, the one resume mechanism, shared with SFT's
`ResumableSampler`; `EvalSampler` shards evaluation). Epochs before the switch do not depend on the
composition or the hard set, so with one seed all five arms train on identical orders until the
switch, and the ablation compares only what Table 7 varies.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import torch.utils.data
from torch.utils.data import DistributedSampler

COMPOSITIONS = ("all", "hard_only", "easy_only", "all_plus_hard", "all_plus_random", "random_only")

# Separate random streams per purpose, so drawing the random extras never shifts an epoch's order.
_SHUFFLE_STREAM, _EXTRA_STREAM = 0, 1


def validate_schedule(
    n: int, hard: Iterable[int], switch_epoch: int, composition: str
) -> list[int]:
    """Check a schedule's arguments; return the hard indices sorted. Raises ValueError."""
    if composition not in COMPOSITIONS:
        raise ValueError(
            f"unknown composition {composition!r}; expected one of {list(COMPOSITIONS)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (dataset size) must be a positive int, got {n!r}")
    if isinstance(switch_epoch, bool) or not isinstance(switch_epoch, int) or switch_epoch < 0:
        raise ValueError(f"switch_epoch must be an int >= 0, got {switch_epoch!r}")
    hard_list = []
    for h in hard:
        if isinstance(h, bool):
            raise ValueError(f"hard indices must be ints, got {h!r}")
        try:
            hard_list.append(operator.index(h))
        except TypeError:
            raise ValueError(f"hard indices must be ints, got {h!r}") from None
    out_of_range = sorted(h for h in hard_list if not 0 <= h < n)
    if out_of_range:
        raise ValueError(f"hard indices out of range [0, {n}): {out_of_range[:10]}")
    if len(set(hard_list)) != len(hard_list):
        repeated = sorted(h for h, c in Counter(hard_list).items() if c > 1)
        raise ValueError(f"hard indices repeated: {repeated[:10]}")
    if composition in ("hard_only", "random_only") and not hard_list:
        raise ValueError(
            f"composition {composition!r} needs hard cases (or as many random ones), but the "
            "hard set is empty"
        )
    if composition == "easy_only" and len(hard_list) == n:
        raise ValueError("composition 'easy_only' needs easy cases, but every sample is hard")
    return sorted(hard_list)


def random_extras(n: int, k: int, seed: int) -> list[int]:
    """The `all_plus_random` extra set (and `random_only`'s set): k distinct indices of
    range(n), fixed for the run.

    Drawn from `seed` alone, not the epoch: Table 7's control is "434 Random Samples", one set the
    size of the hard set, and the hard set itself is the same in every epoch after the switch, so
    the control repeats one random set too. Redrawing per epoch would spread the oversampling over
    more samples and make the control less like the arm it controls for.
    """
    rng = np.random.default_rng([seed, _EXTRA_STREAM, 0])
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def composition_indices(n: int, hard: list[int], composition: str, seed: int) -> list[int]:
    """The multiset of indices an epoch after the switch covers, unshuffled (hard sorted, valid)."""
    if composition == "all":
        return list(range(n))
    if composition == "hard_only":
        return list(hard)
    if composition == "easy_only":
        hard_set = set(hard)
        return [i for i in range(n) if i not in hard_set]
    if composition == "all_plus_hard":
        return [*range(n), *hard]  # an empty hard set makes this plain 'all'
    if composition == "random_only":
        return random_extras(n, len(hard), seed)
    return [*range(n), *random_extras(n, len(hard), seed)]


def epoch_indices(
    n: int, hard: Iterable[int], epoch: int, switch_epoch: int, composition: str, seed: int
) -> list[int]:
    """The global (before sharding) order of dataset indices for one epoch.

    Epochs < switch_epoch: a permutation of range(n). From switch_epoch on: the composition's
    multiset, shuffled. Deterministic in (seed, epoch); no global RNG state is read or changed.

    >>> sorted(epoch_indices(5, [1, 3], 2, switch_epoch=1, composition="all_plus_hard", seed=0))
    [0, 1, 1, 2, 3, 3, 4]
    """
    hard_sorted = validate_schedule(n, hard, switch_epoch, composition)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if epoch < switch_epoch:
        pool = list(range(n))
    else:
        pool = composition_indices(n, hard_sorted, composition, seed)
    rng = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch])
    return [pool[i] for i in rng.permutation(len(pool)).tolist()]


def shard(indices: list[int], num_replicas: int, rank: int, drop_last: bool) -> list[int]:
    """This rank's share of an epoch order, the way torch's DistributedSampler splits it.

    Pad by repeating from the start (or, with drop_last, cut the tail) to a multiple of
    num_replicas, then deal the order out round-robin:

        epoch order  [i0 i1 i2 i3 i4]           num_replicas=2
        padded       [i0 i1 i2 i3 i4 i0]        (drop_last: [i0 i1 i2 i3])
        rank 0       [i0    i2    i4   ]  = padded[0::2]
        rank 1       [   i1    i3    i0]  = padded[1::2]

    Every rank gets the same count, so DDP ranks step in lockstep.
    """
    if drop_last:
        indices = indices[: len(indices) // num_replicas * num_replicas]
    else:
        total = math.ceil(len(indices) / num_replicas) * num_replicas
        padding = total - len(indices)
        indices = indices + (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
    return indices[rank::num_replicas]


def shard_length(length: int, num_replicas: int, drop_last: bool) -> int:
    """How many indices each rank gets from an epoch order of `length`."""
    return length // num_replicas if drop_last else math.ceil(length / num_replicas)


class HardCaseSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's dataset indices for the current epoch of the HCM-GRPO schedule.

    Call `set_epoch(e)` before each epoch (Lightning does so). `len(sampler)` is the rank's full
    count for the current epoch, and grows or shrinks at `switch_epoch`, so a trainer must
    re-read it each epoch. To resume mid-epoch, `set_start(consumed)` makes the iterator skip the
    first `consumed` indices of this rank's order; `len` stays the full count, as a trainer that
    restores its batch counter and stops at `len` batches expects. (The datamodule checkpoints
    the position, `consumed`; the hard set, seed and composition come from the run's config and
    its checkpointed hard set, so they need no state here.)
    """

    def __init__(
        self,
        n: int,
        hard_indices: Iterable[int],
        switch_epoch: int,
        composition: str,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.hard = tuple(validate_schedule(n, hard_indices, switch_epoch, composition))
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        self.n, self.switch_epoch, self.composition, self.seed = n, switch_epoch, composition, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        # Check both regimes now, not hours into training when the switch arrives.
        for regime, length in (("before", n), ("after", self._composition_length())):
            if shard_length(length, num_replicas, drop_last) == 0:
                raise ValueError(
                    f"an epoch {regime} the switch has {length} samples, fewer than "
                    f"num_replicas={num_replicas} with drop_last=True: every rank would get none"
                )
        self.epoch = 0
        self.start = 0

    def _composition_length(self) -> int:
        k = len(self.hard)
        return {
            "all": self.n,
            "hard_only": k,
            "easy_only": self.n - k,
            "all_plus_hard": self.n + k,
            "all_plus_random": self.n + k,
            "random_only": k,
        }[self.composition]

    def epoch_length(self, epoch: int) -> int:
        """This rank's full count for any epoch (e.g. to total the steps for an LR schedule)."""
        length = self.n if epoch < self.switch_epoch else self._composition_length()
        return shard_length(length, self.num_replicas, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. A new epoch starts from its beginning; setting the current one again
        keeps a resume offset, since a trainer calls this after the state has been loaded."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_start(self, consumed: int) -> None:
        """Skip the first `consumed` indices of this rank's order in the current epoch."""
        if not isinstance(consumed, int) or not 0 <= consumed <= len(self):
            raise ValueError(
                f"consumed must be in [0, {len(self)}] (this rank's epoch {self.epoch} length), "
                f"got {consumed!r}"
            )
        self.start = consumed

    def rank_indices(self) -> list[int]:
        """This rank's whole order for the current epoch, ignoring the resume offset."""
        order = epoch_indices(
            self.n, self.hard, self.epoch, self.switch_epoch, self.composition, self.seed
        )
        return shard(order, self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        yield from self.rank_indices()[self.start :]

    def __len__(self) -> int:
        return self.epoch_length(self.epoch)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (an order seeded by (seed, epoch), sharded by rank) that can
    skip the first `start` indices of this rank's order, to resume mid-epoch. As a
    DistributedSampler, Lightning leaves it in place under DDP rather than wrapping it."""

    start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the same epoch again (Lightning, after a resume) keeps start
            self.start = 0
        super().set_epoch(epoch)

    def set_start(self, consumed: int) -> None:
        self.start = consumed

    def __iter__(self):
        order = list(super().__iter__())  # reads the epoch now, as the iteration starts
        yield from order[self.start :]


class EvalSampler(DistributedSampler):
    """This rank's shard of the evaluation split, in order, every sample on exactly one rank:

        N = 5, 2 ranks:   rank 0: 0 2 4        rank 1: 1 3 (0)
                          unique = 3           unique = 2; (0) repeats a sample, not scored

    As torch's DistributedSampler, every rank gets ceil(N / world) rows, so that ranks run
    the same number of batches (a sharded model's forward is collective); the shards it pads
    with repeats come last, and only a shard's first `unique` rows are scored (`scored`: by
    ScreeningModule._unrepeated in evaluation, by hard-case mining through `batches`). As a
    DistributedSampler, Lightning leaves it in place."""

    def __init__(self, dataset, rank: int, world: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False)

    @property
    def unique(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def scored(self, batch_idx: int, batch_size: int, n: int) -> int:
        """How many of the n rows of batch `batch_idx` are this rank's own samples: the rest
        repeat other ranks' samples to pad the shard."""
        return max(0, min(n, self.unique - batch_idx * batch_size))

    def batches(self, batch_size: int) -> list[tuple[list[int], int]]:
        """The shard in batches, each (indices, how many of them to score): the same number of
        batches on every rank, each sample scored on exactly one."""
        order = list(self)
        return [
            (order[s : s + batch_size], self.scored(b, batch_size, len(order[s : s + batch_size])))
            for b, s in enumerate(range(0, len(order), batch_size))
        ]
