""" The data order and the training randomness as functions of the run, not of the launch.

A run's global batch (images per optimizer step) is fixed when it starts; a resumed leg may have another number of
processes and makes it up with gradient accumulation. For the chain of legs to be the uninterrupted run:

* `GlobalBatchSampler` draws each epoch's order from (seed, epoch) and cuts it to whole global batches, so the
  epoch holds the same micro-batches in the same order on every launch. Accelerate deals them out round-robin
  (micro-batch `i` of process `r` of `P` is number `i * P + r` of the epoch), so a step always sums the same
  images, whichever process runs them.
* `reseed_micro_batch` seeds torch, numpy and `random` from (seed, epoch, micro-batch number) before each
  micro-batch: dropout, drop-path and mixup draw the same numbers for the same images on any launch, and nothing
  random needs saving in a checkpoint. (Augmentations are already seeded per image: `ImageFolderDataset`.)
"""
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ['GlobalBatchSampler', 'reseed_micro_batch', 'micro_batch_seed']


class GlobalBatchSampler(Sampler[int]):
    """Indices of `size` images in an order drawn from (`seed`, epoch), cut to a whole number of `global_batch`es."""

    def __init__(self, size: int, global_batch: int, seed: int):
        if size < global_batch:
            raise ValueError(f'the train split has {size} images, fewer than one global batch of {global_batch}')
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.size, generator=generator)[:len(self)].tolist()


def micro_batch_seed(seed: int, epoch: int, number: int) -> int:
    """The seed of micro-batch `number` (counted over every process) of `epoch`."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + number) % 2 ** 63


def reseed_micro_batch(seed: int, epoch: int, number: int) -> None:
    """Seed torch (every device), numpy and `random` for micro-batch `number` of `epoch`."""
    value = micro_batch_seed(seed, epoch, number)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2 ** 32)
