"""Batches for the range test, training and evaluation.

Every random draw of an epoch (the shuffle and each augmentation) comes from (train.seed, epoch) alone, so
an epoch replays the same batches whether the run started at epoch 1 or resumed from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from onecycle import augment
from onecycle.config import AugmentParams
from onecycle.data import Dataset, Split


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) of one epoch, independent streams from (seed, epoch)."""
    shuffle, augmentation = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle), int(augmentation)


def train_batches(
    dataset: Dataset,
    params: AugmentParams,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented training batches; the last one may be smaller (none is dropped).

    Under torchrun every process draws the same shuffle and takes its share (`rank`, `world`) of each batch
    of `batch_size`, with augmentations of its own.
    """
    shuffle_seed, augment_seed = epoch_seeds(seed, epoch)
    order = np.random.default_rng(shuffle_seed).permutation(len(dataset.train.labels))
    transform = augment.train_transform(params, dataset.mean, dataset.std, seed=(augment_seed + rank) % 2**32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size][rank::world]
        x = torch.from_numpy(augment.augment_batch(transform, dataset.train.images[index]))
        y = torch.from_numpy(dataset.train.labels[index])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def endless_train_batches(
    dataset: Dataset, params: AugmentParams, batch_size: int, *, seed: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches epoch after epoch, for a sweep that may be longer than the (small) training set."""
    epoch = 1
    while True:
        yield from train_batches(dataset, params, batch_size, seed=seed, epoch=epoch, device=device)
        epoch += 1


def eval_batches(
    split: Split, mean, std, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, only normalised."""
    transform = augment.test_transform(mean, std)
    for start in range(0, len(split.labels), batch_size):
        x = torch.from_numpy(augment.augment_batch(transform, split.images[start : start + batch_size]))
        y = torch.from_numpy(split.labels[start : start + batch_size])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
