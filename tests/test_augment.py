"""The augmentation: what each transform does to an image, and how often, read back from the pixels.

The probe image encodes its own coordinates (red = 8 * row, green = 8 * column, blue = 3 + row + column, never
the hole's fill), so every output can be decoded into crop offsets, flip and hole, and then rebuilt exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from onecycle import augment
from onecycle.config import AugmentParams

MEAN = (125.3, 122.95, 113.87)  # pixel units, close to CIFAR-10's
STD = (62.99, 62.09, 66.70)
FILL = (125, 123, 114)  # MEAN rounded: what the hole must hold
SIZE = 32  # pixels, side of a CIFAR-10 image
N = 3000  # images per distribution test


def probe_image() -> np.ndarray:
    row, col = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([8 * row, 8 * col, 3 + row + col], axis=-1).astype(np.uint8)  # (32, 32, 3); blue < FILL[2]


def augment_probes(params: AugmentParams, n: int, seed: int, mean=MEAN, std=STD) -> np.ndarray:
    """n augmented copies of the probe, back in pixel units: int (n, crop, crop, 3)."""
    out = augment.augment_batch(
        augment.train_transform(params, mean, std, seed=seed), np.repeat(probe_image()[None], n, 0)
    )
    pixels = out.transpose(0, 2, 3, 1) * np.array(std) + np.array(mean)  # undo the normalisation
    assert np.abs(pixels - np.rint(pixels)).max() < 1e-3  # normalise then undo is exact to float32 rounding
    return np.rint(pixels).astype(int)


def decode(pixels: np.ndarray, params: AugmentParams) -> dict:
    """Crop offsets, flip and hole of one augmented probe; asserts the image is exactly what they describe."""
    pad, crop, cutout = params.pad, params.crop, params.cutout
    source = np.pad(probe_image().astype(int), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")  # reflect-101
    hole = (pixels == FILL).all(axis=2)
    # the hole is narrower than the crop, so the first or the last pixel of each row / column is the image's
    rows = np.where(hole[:, 0], pixels[:, -1, 0], pixels[:, 0, 0]) // 8  # source row of each output row
    cols = np.where(hole[0, :], pixels[-1, :, 1], pixels[0, :, 1]) // 8
    offsets = range(source.shape[0] - crop + 1)
    index = np.pad(np.arange(SIZE), pad, mode="reflect")  # source coordinate of each padded coordinate
    dy = [d for d in offsets if (index[d : d + crop] == rows).all()]
    dx_flip = [(d, f) for d in offsets for f in (False, True) if (index[d : d + crop][:: -1 if f else 1] == cols).all()]
    assert len(dy) == 1 and len(dx_flip) == 1, "not a crop of the reflect-101 padded image"
    (dy,), ((dx, flip),) = dy, dx_flip

    expected = source[dy : dy + crop, dx : dx + crop]
    if flip:
        expected = expected[:, ::-1]
    top = left = None
    if hole.any():
        top, left = np.argwhere(hole)[0]  # first hole pixel in row-major order: the top-left corner
        expected = expected.copy()
        expected[top : top + cutout, left : left + cutout] = FILL
    assert (pixels == expected).all(), "the output is not crop -> flip -> one cutout x cutout hole"
    return {"dy": dy, "dx": dx, "flip": flip, "top": top, "left": left, "hole_pixels": int(hole.sum())}


def assert_uniform(values: list[int], support: range) -> None:
    """Every value of `support` occurs, each within 5 binomial sigmas of len(values) / len(support)."""
    counts = np.bincount(values, minlength=support.stop)[support.start :]
    assert len(counts) == len(support), f"values outside {support}: {sorted(set(values))}"
    p = 1 / len(support)
    expected, sigma = len(values) * p, np.sqrt(len(values) * p * (1 - p))
    assert (np.abs(counts - expected) < 5 * sigma).all(), f"counts {counts.tolist()}, expected {expected:.0f} each"


@pytest.fixture(scope="module")
def default_draws() -> list[dict]:
    params = AugmentParams()
    return [decode(p, params) for p in augment_probes(params, N, seed=0)]


def test_every_crop_offset_occurs_uniformly(default_draws):
    assert_uniform([d["dy"] for d in default_draws], range(0, 9))  # 0..2*pad with pad=4
    assert_uniform([d["dx"] for d in default_draws], range(0, 9))


def test_exactly_one_hole_of_cutout_size_filled_with_rounded_mean_anywhere_inside(default_draws):
    # decode already checked each hole is one 8x8 square of FILL inside the image; here: always there, uniform
    assert all(d["hole_pixels"] == 8 * 8 for d in default_draws)
    assert_uniform([int(d["top"]) for d in default_draws], range(0, 32 - 8 + 1))
    assert_uniform([int(d["left"]) for d in default_draws], range(0, 32 - 8 + 1))


def test_hole_normalises_to_about_zero():
    out = augment.augment_batch(augment.train_transform(AugmentParams(), MEAN, STD, seed=1), probe_image()[None])[0]
    blue_in_hole = np.isclose(out[2], (FILL[2] - MEAN[2]) / STD[2], atol=1e-6)  # the probe's blue never is 114
    assert blue_in_hole.sum() == 8 * 8
    assert (np.abs(out[:, blue_in_hole]) <= 0.5 / np.array(STD)[:, None]).all()  # |round(m) - m| / s <= 0.5 / s


@pytest.mark.parametrize("flip_p", [0.0, 0.2, 0.5, 1.0])
def test_flip_rate(flip_p):
    params = AugmentParams(flip_p=flip_p)
    flips = sum(decode(p, params)["flip"] for p in augment_probes(params, 1000, seed=2))
    assert abs(flips - 1000 * flip_p) <= 5 * np.sqrt(1000 * flip_p * (1 - flip_p))  # exact at p = 0 and p = 1


def test_random_choices_are_independent():
    # albumentations seeds every child of a Compose with the same number, which ties the crop to the flips
    # (image 1 flips exactly when its crop lies in the upper half); train_transform must not inherit that
    params = AugmentParams()
    first = [decode(augment_probes(params, 1, seed=s)[0], params) for s in range(400)]  # first image per seed
    batch = [decode(p, params) for p in augment_probes(params, 800, seed=3)]
    pairs = [(first[i]["dy"], first[i]["flip"]) for i in range(400)]  # crop and flip of the same image
    pairs += [(batch[j]["dy"], batch[2 * j]["flip"]) for j in range(400)]  # of images j and 2j
    pairs += [(batch[j]["dx"], batch[2 * j + 1]["flip"]) for j in range(400)]
    for i in range(0, len(pairs), 400):
        upper = [f for dy, f in pairs[i : i + 400] if dy < 4]
        lower = [f for dy, f in pairs[i : i + 400] if dy > 4]
        assert abs(np.mean(upper) - np.mean(lower)) < 0.2, "the flip follows the crop"  # sd ~0.05 if independent


def test_padding_is_reflect_101_like_torch():
    import torch
    import torch.nn.functional as F

    # crop = whole padded image, nothing random left: the output is the padding itself
    params = AugmentParams(pad=4, crop=40, flip_p=0.0, cutout=0)
    image = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    out = augment.augment_batch(augment.train_transform(params, (0, 0, 0), (1, 1, 1), seed=0), image)
    assert out.shape == (2, 3, 40, 40)
    probe = augment_probes(params, 1, seed=0, mean=(0, 0, 0), std=(1, 1, 1))[0]
    assert (probe[:, 4, 0] // 8).tolist() == [4, 3, 2, 1, *range(0, 32), 30, 29, 28, 27]  # edge row not repeated
    torch_padded = F.pad(torch.from_numpy(image).permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="reflect")
    np.testing.assert_array_equal(out, torch_padded.numpy())


@pytest.mark.parametrize(
    "params",
    [AugmentParams(pad=0, flip_p=0.0, cutout=0), AugmentParams(pad=4, flip_p=0.0, cutout=0)],
    ids=["no-pad", "no-cutout"],
)
def test_zero_pad_or_cutout_turns_the_step_off(params):
    draws = [decode(p, params) for p in augment_probes(params, 200, seed=4)]
    assert all(d["hole_pixels"] == 0 for d in draws)
    if params.pad == 0:  # a 32 crop of the unpadded image: the image itself
        assert all(d["dy"] == d["dx"] == 0 for d in draws)
    else:
        assert_uniform([d["dy"] for d in draws], range(0, 9))


def test_other_sizes_keep_the_same_rules():
    params = AugmentParams(pad=2, crop=34, flip_p=0.5, cutout=5)
    draws = [decode(p, params) for p in augment_probes(params, 500, seed=5)]  # decode checks each one exactly
    assert {d["dy"] for d in draws} == {0, 1, 2} and {d["dx"] for d in draws} == {0, 1, 2}  # 36 - 34 + 1 offsets
    assert all(d["hole_pixels"] == 5 * 5 for d in draws)


def test_test_transform_only_normalises():
    images = np.random.default_rng(1).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    out = augment.augment_batch(augment.test_transform(MEAN, STD), images)
    expected = (images.transpose(0, 3, 1, 2) - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)


def test_augment_batch_returns_contiguous_float32_nchw():
    images = np.zeros((5, SIZE, SIZE, 3), dtype=np.uint8)
    for params in (AugmentParams(), AugmentParams(crop=36)):
        out = augment.augment_batch(augment.train_transform(params, MEAN, STD, seed=0), images)
        assert out.shape == (5, 3, params.crop, params.crop) and out.dtype == np.float32
        assert out.flags.c_contiguous
    with pytest.raises(ValueError, match="uint8"):
        augment.augment_batch(augment.test_transform(MEAN, STD), images.astype(np.float32))


def test_strict_mode_rejects_a_wrong_argument():
    image = probe_image()
    for transform in (augment.train_transform(AugmentParams(), MEAN, STD), augment.test_transform(MEAN, STD)):
        with pytest.raises(ValueError, match="imgae"):
            transform(image=image, imgae=image)


def test_same_seed_same_bytes_different_seed_different():
    images = np.random.default_rng(2).integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)

    def run(seed):
        return augment.augment_batch(augment.train_transform(AugmentParams(), MEAN, STD, seed=seed), images)

    assert run(7).tobytes() == run(7).tobytes()
    assert run(7).tobytes() != run(8).tobytes()
    # reseeding a used transform replays it: what training does at the start of every epoch, and on resume
    transform = augment.train_transform(AugmentParams(), MEAN, STD, seed=7)
    augment.augment_batch(transform, images)
    augment.reseed(transform, 7)
    assert augment.augment_batch(transform, images).tobytes() == run(7).tobytes()
