"""The paper's train/test split of a public benchmark (section 5.4): 1:1, seeded, stratified.

Within each subtask the ids are sorted, shuffled with a generator seeded by (seed, subtask) and
the first `floor(n * train_fraction)` go to train, the rest to test. Seeding per subtask makes a
subtask's split independent of which other subtasks are present, and sorting first makes it
independent of the order rows are stored in.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence


def stratified_split(
    ids: Sequence[str], groups: Sequence[str], train_fraction: float = 0.5, seed: int = 0
) -> dict[str, list[str]]:
    """{"train": ids, "test": ids}, each in the input's order.

    >>> stratified_split(["a", "b", "c", "d"], ["x", "x", "y", "y"], 0.5, seed=0)["train"]
    ['b', 'c']
    """
    if len(ids) != len(groups):
        raise ValueError(f"{len(ids)} ids but {len(groups)} groups")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    by_group: dict[str, list[str]] = defaultdict(list)
    for i, g in zip(ids, groups, strict=True):
        by_group[g].append(i)
    train: set[str] = set()
    for group, members in by_group.items():
        members = sorted(members)
        random.Random(f"{seed}:{group}").shuffle(members)
        train.update(members[: int(len(members) * train_fraction)])
    return {
        "train": [i for i in ids if i in train],
        "test": [i for i in ids if i not in train],
    }
