"""Batches for the range test, training and evaluation, with either augmentation backend.

Every random draw of an epoch (the shuffle and each augmentation) comes from (train.seed, epoch) alone, so
an epoch replays the same batches whether the run started at epoch 1 or resumed from a checkpoint.

Backends (augment.backend): `albumentations` augments image by image on the CPU (the reference);
`tensor` keeps the uint8 images on the training device and augments whole batches there
(`augment_tensor`), drawing from the same distribution; `auto` is tensor on a GPU, albumentations on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from onecycle.augment_tensor import TensorAugment, to_nchw
from onecycle.config import AugmentParams
from onecycle.data import Dataset, Split

Batch = tuple[torch.Tensor, torch.Tensor]  # images (N, 3, H, W) float32 normalised, labels (N,) int64


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) of one epoch, independent streams from (seed, epoch)."""
    shuffle, augmentation = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(shuffle), int(augmentation)


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "tensor" if device.type == "cuda" else "albumentations"
    return name


class TrainLoader:
    """Shuffled, augmented training batches of one dataset on one device; the last batch may be smaller.

    Under torchrun every process draws the same shuffle and takes its share (`rank`, `world`) of each batch
    of `batch_size`, with augmentations of its own.
    """

    def __init__(self, dataset: Dataset, params: AugmentParams, batch_size: int, device: torch.device) -> None:
        self.dataset, self.params, self.batch_size, self.device = dataset, params, batch_size, device
        self.backend = resolve_backend(params.backend, device)
        if self.backend == "tensor":  # the whole training set on the device once, padded uint8 (5 KB an image)
            self.augment = TensorAugment(params, dataset.mean, dataset.std)
            self.images = self.augment.store(dataset.train.images, device)
            self.labels = torch.from_numpy(dataset.train.labels).to(device)

    def epoch(self, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        shuffle_seed, augment_seed = epoch_seeds(seed, epoch)
        augment_seed = (augment_seed + rank) % 2**32  # each process its own draws
        order = np.random.default_rng(shuffle_seed).permutation(len(self.dataset.train.labels))
        if self.backend == "tensor":
            generator = torch.Generator(device=self.device).manual_seed(augment_seed)
            order_t = torch.from_numpy(order).to(self.device)
            for start in range(0, len(order), self.batch_size):
                index = order_t[start : start + self.batch_size][rank::world]
                yield self.augment(self.images[index], generator, padded=True), self.labels[index]
        else:
            # imported here: albumentations and OpenCV take about 0.8 s to import, which the tensor backend
            # (the GPU's) never needs, and every stage is a fresh process
            from onecycle import augment

            transform = augment.train_transform(self.params, self.dataset.mean, self.dataset.std, seed=augment_seed)
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size][rank::world]
                x = torch.from_numpy(augment.augment_batch(transform, self.dataset.train.images[index]))
                y = torch.from_numpy(self.dataset.train.labels[index])
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def endless(self, *, seed: int) -> Iterator[Batch]:
        """Epoch after epoch, for a sweep that may be longer than the (small) training set."""
        epoch = 1
        while True:
            yield from self.epoch(seed=seed, epoch=epoch)
            epoch += 1


class EvalSet:
    """A split on the device, normalised once (the test transform's arithmetic), in order. Each evaluation then
    only slices it: no copy from the host per batch, which on CUDA would wait for the GPU to finish first."""

    def __init__(self, split: Split, mean, std, device: torch.device) -> None:
        normalise = TensorAugment(AugmentParams(pad=0, cutout=0), mean, std).normalize
        self.images = normalise(to_nchw(split.images, device))  # float32 (N, 3, 32, 32): 12 KB an image
        self.labels = torch.from_numpy(split.labels).to(device)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.labels), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


def eval_batches(split: Split, mean, std, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """The split in order, only normalised (on the device: the same arithmetic as the test transform)."""
    return EvalSet(split, mean, std, device).batches(batch_size)
