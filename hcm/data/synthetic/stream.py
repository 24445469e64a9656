"""Fresh synthetic samples every step, for training on an unbounded stream."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from hcm.data.records import ScreeningSample
from hcm.data.synthetic.config import SyntheticConfig
from hcm.data.synthetic.sample import generate_sample


class SyntheticStream(torch.utils.data.IterableDataset):
    """A fresh sample every step, for training on an unbounded synthetic stream.

    Samples come from split f"{name}-e{epoch}", so each epoch draws new ones. Sample j of a rank
    (j = 0, 1, ...) has index rank + world * j, and worker w of W takes j = w, w + W, ...:

        world=2, W=2   rank 0: worker 0 -> 0, 4, 8, ...   worker 1 -> 2, 6, 10, ...
                       rank 1: worker 0 -> 1, 5, 9, ...   worker 1 -> 3, 7, 11, ...

    so no two workers or ranks ever draw the same sample, and a run is reproducible for a given
    (seed, epoch, world, workers). `samples_per_epoch` (None = endless) is the total over ranks;
    each rank draws samples_per_epoch // world, so ranks stay in step. Call `set_epoch` before
    each epoch (it reaches workers unless they are persistent).
    """

    def __init__(
        self,
        cfg: SyntheticConfig | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        name: str = "stream",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg or SyntheticConfig()
        self.seed, self.samples_per_epoch, self.name = seed, samples_per_epoch, name
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def __iter__(self) -> Iterator[ScreeningSample]:
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        per_rank = None if self.samples_per_epoch is None else self.samples_per_epoch // world
        j = worker
        while per_rank is None or j < per_rank:
            yield generate_sample(
                self.cfg, self.seed, f"{self.name}-e{self.epoch}", rank + world * j
            )
            j += workers
