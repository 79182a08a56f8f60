"""The training augmentation on whole batches with torch ops (CPU or CUDA): the fast path's backend.

It draws from the same distribution as `augment.train_transform` (the albumentations reference), with the same
steps in the same order: reflect-101 pad by `pad` -> random `crop` x `crop` window -> horizontal flip with
probability `flip_p` -> one `cutout` x `cutout` hole wholly inside the crop, filled with round(mean) per channel
-> normalise (x - mean) / std. Every step but the last works on uint8, and the normalisation uses the same
float32 arithmetic as albumentations' Normalize, so given the same random choices the two backends give the same
bytes. Only the random streams differ: here all randomness comes from one torch.Generator per call.

Layout: contiguous NCHW uint8 is the fast input: padding and cropping run along rows of one channel. NHWC is
accepted too, as a permuted view, but reflect-padding channels-last memory is several times slower on the CPU, so
convert a dataset once with `to_nchw` (e.g. the whole training set onto the GPU up front). The output is
contiguous NCHW float32, like `augment.augment_batch`'s.

No loop over images: one reflect pad of the batch, one gather of every image's crop window (advanced indexing on
an as_strided view of all windows), the flip as one torch.where over whole images, the holes as one scatter_.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from onecycle.config import IMAGE_SIZE, AugmentParams

Triple = tuple[float, float, float]


class Draws(NamedTuple):
    """The random choices for a batch of N images, int64 (N,) tensors; pixel coordinates in the padded image
    (crop) and in the crop (hole)."""

    dy: torch.Tensor  # top row of the crop window, 0..(H + 2 * pad - crop)
    dx: torch.Tensor  # left column of the crop window, 0..(W + 2 * pad - crop)
    flip: torch.Tensor  # bool: mirror the crop left to right
    top: torch.Tensor  # top row of the hole in the (flipped) crop, 0..(crop - cutout)
    left: torch.Tensor  # left column of the hole, 0..(crop - cutout)


def to_nchw(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W), numpy or torch -> contiguous uint8 (N, 3, H, W) on `device`.

    Do it once per dataset, not per batch: the permute is a full copy (None keeps a tensor's device; numpy -> CPU).
    """
    x = _nchw_view(torch.as_tensor(images))
    return x.to(device).contiguous() if device is not None else x.contiguous()


class TensorAugment:
    """The training transform for uint8 batches: `TensorAugment(params, mean, std)(images, generator)`.

    `mean` and `std` are per channel in pixel units (0..255), as `data.channel_stats` returns them.
    """

    def __init__(self, params: AugmentParams, mean: Triple, std: Triple, image_size: int = IMAGE_SIZE):
        self.params = params
        self.image_size = image_size  # pixels, side of the (square) input images
        padded = image_size + 2 * params.pad
        if not image_size <= params.crop <= padded:
            raise ValueError(f"augment.crop must be from {image_size} to {padded} (image + 2 * pad), got {params.crop}")
        if not 0 <= params.cutout <= params.crop:
            raise ValueError(f"augment.cutout must be from 0 to augment.crop = {params.crop}, got {params.cutout}")
        # the same float32 numbers as albumentations' Normalize(max_pixel_value=1): out = (x - mean) * (1 / std)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.inv_std = 1 / torch.tensor(std, dtype=torch.float32)
        # Python's round() like augment.train_transform (ties to even), so both backends fill the same bytes
        self.fill = torch.tensor([int(round(m)) for m in mean], dtype=torch.uint8)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def store(self, images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """A dataset as the fast path keeps it: uint8 NCHW on `device`, padded once (reflect-101) for all epochs,
        so no batch pays for the padding again. Pass it to `__call__` with `padded=True`."""
        x = to_nchw(images, device)
        return F.pad(x, (self.params.pad,) * 4, mode="reflect") if self.params.pad > 0 else x

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *, padded: bool = False) -> torch.Tensor:
        """uint8 (N, 3, H, W) or (N, H, W, 3) on any device -> normalised float32 (N, 3, crop, crop), same device.

        All randomness comes from `generator`: the same generator state gives the same output. A CPU generator
        gives the same choices whatever the images' device (reproducible on the CPU); one on the images' CUDA
        device saves a small host-to-device copy per call.
        """
        draws = self.draw(len(images), generator)
        if draws.dy.device != images.device:
            # one copy instead of five; a generator on the images' device needs none
            packed = torch.stack([d.long() for d in draws]).to(images.device, non_blocking=True)  # (5, N)
            draws = Draws(packed[0], packed[1], packed[2].bool(), packed[3], packed[4])
        return self.apply(images, draws, padded=padded)

    def draw(self, n: int, generator: torch.Generator) -> Draws:
        """The random choices for n images, on the generator's device; always five draws in this order, so the
        crops and flips of a seed do not depend on `cutout`."""
        p, device = self.params, generator.device
        offsets = self.image_size + 2 * p.pad - p.crop + 1  # crop positions per axis
        holes = p.crop - p.cutout + 1  # hole positions per axis

        def uniform(high: int) -> torch.Tensor:
            return torch.randint(0, high, (n,), generator=generator, device=device)

        dy, dx = uniform(offsets), uniform(offsets)
        flip = torch.rand(n, generator=generator, device=device) < p.flip_p  # like albumentations: random() < p
        top, left = uniform(holes), uniform(holes)
        return Draws(dy, dx, flip, top, left)

    def apply(self, images: torch.Tensor, draws: Draws, *, padded: bool = False) -> torch.Tensor:
        """The deterministic part: `images` transformed as `draws` (tensors on the images' device) say.
        `padded`: the images come from `store`, already padded."""
        p = self.params
        x = _nchw_view(images)
        side = self.image_size + (2 * p.pad if padded else 0)
        if x.shape[-2:] != (side, side):
            raise ValueError(f"expected {side}x{side} images, got {tuple(images.shape)}")
        n = torch.arange(len(x), device=x.device)
        if p.pad > 0 and not padded:
            x = F.pad(x, (p.pad,) * 4, mode="reflect")  # reflect-101: abc|bcd, the edge pixel is not repeated
        # one gather from a view of every crop window; a fresh tensor, so the steps below may work in place
        out = _windows(x, p.crop)[n, :, draws.dy, draws.dx].contiguous()  # (N, 3, crop, crop) uint8
        _flip_where(out, draws.flip)
        if p.cutout > 0:
            _, _, fill = self._on(x.device)
            _fill_squares(out, draws.top, draws.left, p.cutout, fill)
        return self._normalise(out)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The test transform: uint8 (N, 3, H, W) or (N, H, W, 3) -> float32 (N, 3, H, W), (x - mean) / std."""
        return self._normalise(_nchw_view(images))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, inv_std, _ = self._on(x.device)
        # copy_ converts uint8 -> float32 in one vectorised pass; the in-place ops then allocate nothing more
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out.copy_(x)
        return out.sub_(mean[:, None, None]).mul_(inv_std[:, None, None])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, 1 / std, fill) on `device`, copied there once."""
        if device not in self._constants:
            self._constants[device] = (self.mean.to(device), self.inv_std.to(device), self.fill.to(device))
        return self._constants[device]


def _nchw_view(images: torch.Tensor) -> torch.Tensor:
    """A (N, 3, H, W) view of uint8 NCHW or NHWC images (no copy)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W) or (N, H, W, 3), got {got}")
    if len(images) == 0:
        raise ValueError("expected at least one image, got none")
    if images.shape[1] == 3:
        return images
    if images.shape[3] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"expected 3 channels in dimension 1 (NCHW) or 3 (NHWC), got shape {tuple(images.shape)}")


def _windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """Every size x size window of (N, C, H, W) as a view (N, C, H - size + 1, W - size + 1, size, size).

    Indexing it with per-image (row, column) tensors copies one window per image, with plain strides inside
    the window: far faster than an index per pixel. Read only: the windows overlap, and writes through
    overlapping views are undefined for some kernels (CUDA's deterministic index_put_ copies and writes back).
    """
    s = x.stride()
    shape = (*x.shape[:2], x.shape[2] - size + 1, x.shape[3] - size + 1, size, size)
    return x.as_strided(shape, (s[0], s[1], s[2], s[3], s[2], s[3]))


def _flip_where(x: torch.Tensor, flip: torch.Tensor) -> None:
    """Mirror images x[i] (contiguous, uint8) left to right in place where flip[i]."""
    mirrored = x.flip(-1)
    # choosing whole images needs no per-byte work: compare and copy them in the widest words their size allows
    # (8x fewer elements for 3 x 32 x 32 bytes)
    n_bytes = x[0].numel()
    word = next(d for d in (torch.int64, torch.int32, torch.int16, torch.uint8) if n_bytes % d.itemsize == 0)
    words, mirrored_words = x.view(len(x), -1).view(word), mirrored.view(len(x), -1).view(word)
    torch.where(flip[:, None], mirrored_words, words, out=words)


def _fill_squares(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, fill: torch.Tensor) -> None:
    """Set the size x size square at (top[i], left[i]) of x[i] (contiguous (N, C, H, W)) to fill (C,), in place."""
    n, channels, _, width = x.shape
    ar = torch.arange(size, device=x.device)
    # flat position of every square pixel in its image plane: (N, size * size), no two alike within an image,
    # so scatter_ is deterministic everywhere
    position = (((top[:, None] + ar) * width)[:, :, None] + (left[:, None] + ar)[:, None, :]).view(n, 1, -1)
    shape = (n, channels, size * size)
    x.view(n, channels, -1).scatter_(2, position.expand(shape), fill.view(1, channels, 1).expand(shape))
