"""Deterministic data streams for iteration-based training and sharded evaluation.

Training draws an infinite stream of samples: global position ``p`` (iteration ``it`` holds positions
``it·G … it·G+G-1`` for global batch ``G``) maps to sample ``perm_e[p mod N]`` with a per-epoch
permutation seeded by (seed, epoch), and is augmented with ``numpy.random.default_rng([seed, p])``.
Rank ``r`` of ``W`` takes the contiguous slice ``r·G/W … (r+1)·G/W`` of each global batch.  Every
sample is therefore a pure function of (seed, position): a resumed run or a ``torchrun`` run with the
same global batch sees exactly the batches of an uninterrupted single-process run, independently of
DataLoader workers.

``fresh=True`` (procedural datasets such as the toy world, which render any index) maps position ``p`` to
sample ``p`` itself: no image is drawn twice, so a run cannot over-fit a fixed pool of training images.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

import numpy as np


class SamplePlan:
    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError("empty dataset")
        self.n, self.seed, self.shuffle = num_samples, seed, shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._cache[epoch] = torch.randperm(self.n, generator=g)
            else:
                self._cache[epoch] = torch.arange(self.n)
        return self._cache[epoch]

    def index(self, position: int) -> int:
        return int(self.permutation(position // self.n)[position % self.n])


class TrainStream(Dataset):
    """Map-style view of this rank's share of iterations ``[start_iter, max_iters)``."""

    def __init__(self, dataset, transform, global_batch: int, max_iters: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_iter: int = 0, fresh: bool = False) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.dataset, self.transform = dataset, transform
        self.global_batch, self.local_batch = global_batch, global_batch // world_size
        self.rank, self.seed = rank, seed
        self.start_iter, self.max_iters = start_iter, max_iters
        self.fresh = bool(fresh)
        self.plan = None if self.fresh else SamplePlan(len(dataset), seed)

    def __len__(self) -> int:
        return max(self.max_iters - self.start_iter, 0) * self.local_batch

    def position(self, i: int) -> int:
        it, j = divmod(i, self.local_batch)
        return (self.start_iter + it) * self.global_batch + self.rank * self.local_batch + j

    def __getitem__(self, i: int):
        pos = self.position(i)
        image, label = self.dataset[pos if self.fresh else self.plan.index(pos)]
        rng = np.random.default_rng([self.seed, pos])
        return self.transform(image, label, rng)


def train_loader(stream: TrainStream, num_workers: int = 0) -> DataLoader:
    return DataLoader(stream, batch_size=stream.local_batch, shuffle=False, drop_last=False,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=False)


class EvalShard(Dataset):
    """Every ``world_size``-th image starting at ``rank``; items (image, label, index)."""

    def __init__(self, dataset, transform, rank: int = 0, world_size: int = 1, limit: int | None = None):
        n = len(dataset) if limit is None else min(limit, len(dataset))
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        image, label = self.dataset[idx]
        img_t, lbl_t = self.transform(image, label)
        return img_t, lbl_t, idx


def eval_loader(shard: EvalShard, num_workers: int = 0) -> DataLoader:
    return DataLoader(shard, batch_size=None, shuffle=False, num_workers=num_workers)
