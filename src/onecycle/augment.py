"""Training and test transforms (albumentations), applied to uint8 NHWC batches.

Train: reflect-101 pad -> random crop -> horizontal flip -> one cutout hole filled with the training mean
-> normalise. Test: normalise only. Means and stds are per channel in pixel units (0..255).

Seeding: `reseed` gives every random transform its own stream derived from one seed. albumentations'
own `Compose.set_random_seed(s)` seeds every child with the same `s`, so the crop's first draws equal
the flip's draws (the first image is flipped exactly when its crop lies in the upper half, and the flips
of images 2j-1 and 2j decide the crop of image j); `reseed` keeps the determinism without that coupling.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from onecycle.config import IMAGE_SIZE, AugmentParams

Triple = tuple[float, float, float]


def reseed(transform: A.Compose, seed: int | None) -> A.Compose:
    """Restart `transform`'s randomness: the same seed gives the same draws, hence the same output bytes.

    Each child transform gets its own seed spawned from `seed`, so their random streams are independent.
    None draws fresh entropy (not reproducible). Returns `transform` for chaining.
    """
    transform.set_random_seed(seed)  # the Compose's own generator (and, for None, fresh children)
    if seed is not None:
        children = np.random.SeedSequence(seed).spawn(len(transform.transforms))
        for child, seq in zip(transform.transforms, children, strict=True):
            child.set_random_seed(int(seq.generate_state(1, dtype=np.uint64)[0]))
    return transform


def _normalize(mean: Triple, std: Triple) -> A.Normalize:
    # max_pixel_value=1.0 because mean and std are already in pixel units: out = (x - mean) / std
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0)


def train_transform(params: AugmentParams, mean: Triple, std: Triple, seed: int | None = None) -> A.Compose:
    """Pad, random crop, flip, one cutout hole, normalise; `mean`, `std` per channel in pixel units (0..255)."""
    steps: list = []
    if params.pad > 0:
        side = IMAGE_SIZE + 2 * params.pad  # pixels: the image plus `pad` on every side
        # reflect-101 (abc|bcd, no repeated edge pixel) keeps border statistics natural: no black frame for the
        # network to learn to ignore. torch's F.pad(mode="reflect") follows the same rule.
        steps.append(A.PadIfNeeded(min_height=side, min_width=side, border_mode=cv2.BORDER_REFLECT_101))
    steps.append(A.RandomCrop(height=params.crop, width=params.crop))
    steps.append(A.HorizontalFlip(p=params.flip_p))
    if params.cutout > 0:
        # filled with the rounded training mean, which normalises to ~0: the hole carries no signal and barely
        # moves the BatchNorm statistics
        fill = tuple(int(round(m)) for m in mean)
        size = (params.cutout, params.cutout)  # pixels
        steps.append(
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=size, hole_width_range=size, fill=fill, p=1.0)
        )
    steps.append(_normalize(mean, std))
    return reseed(A.Compose(steps, strict=True, seed=seed), seed)


def test_transform(mean: Triple, std: Triple) -> A.Compose:
    """Normalise only: out = (x - mean) / std, with `mean`, `std` per channel in pixel units."""
    return A.Compose([_normalize(mean, std)], strict=True)


test_transform.__test__ = False  # not a test, although pytest collects `test_*` names imported into test modules


def augment_batch(transform: A.Compose, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 NCHW (contiguous, ready for torch.from_numpy), one image at a time.

    The transform's random state advances with every image, so the result depends on the order of calls.
    """
    _check_images(images)
    first = transform(image=images[0])["image"]  # (crop, crop, 3) float32
    out = np.empty((len(images), first.shape[2], first.shape[0], first.shape[1]), dtype=np.float32)
    out[0] = first.transpose(2, 0, 1)
    for i in range(1, len(images)):
        out[i] = transform(image=images[i])["image"].transpose(2, 0, 1)
    return out


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {got}")
    if len(images) == 0:
        raise ValueError("expected at least one image, got none")
