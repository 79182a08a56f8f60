"""The tensor backend against the albumentations reference: same steps, same distribution, same bytes.

Both backends augment copies of a probe image that encodes its own coordinates (red = 8 * row, green = 8 * column,
blue = 3 + row + column, never the hole's fill), so every output decodes into crop offsets, flip and hole, and is
then rebuilt from them and compared byte for byte. Histograms of the decoded choices are compared between the
backends with a chi-square test of homogeneity; seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from onecycle import augment
from onecycle.augment_tensor import Draws, TensorAugment, to_nchw
from onecycle.config import AugmentParams

MEAN = (125.3, 122.5, 113.87)  # pixel units; 122.5 is a tie: Python's round() gives 122 in both backends
STD = (62.99, 62.09, 66.70)
FILL = (125, 122, 114)  # round(MEAN): what the hole holds before normalisation
SIZE = 32  # pixels, side of a CIFAR-10 image
N = 3000  # images per backend in the distribution tests


def probe_image() -> np.ndarray:
    row, col = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([8 * row, 8 * col, 3 + row + col], axis=-1).astype(np.uint8)  # (32, 32, 3); blue < 114


def probes(n: int) -> np.ndarray:
    return np.repeat(probe_image()[None], n, 0)  # (n, 32, 32, 3)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8-valued (n, h, w, 3) -> float32 (n, 3, h, w) with albumentations' Normalize arithmetic, all float32:
    (x - mean) * (1 / std). test_normalize_is_the_test_transform checks it gives the same bytes."""
    mean, inv_std = np.array(MEAN, np.float32), np.reciprocal(np.array(STD, np.float32))
    return ((pixels.astype(np.float32) - mean) * inv_std).transpose(0, 3, 1, 2)


def to_pixels(out: torch.Tensor | np.ndarray) -> np.ndarray:
    """Normalised float32 (n, 3, h, w) -> int (n, h, w, 3) pixel values."""
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    pixels = out.transpose(0, 2, 3, 1) * np.array(STD) + np.array(MEAN)
    assert np.abs(pixels - np.rint(pixels)).max() < 1e-3  # normalise then undo is exact to float32 rounding
    return np.rint(pixels).astype(int)


def tensor_outputs(params: AugmentParams, n: int, seed: int) -> torch.Tensor:
    return TensorAugment(params, MEAN, STD)(to_nchw(probes(n)), torch.Generator().manual_seed(seed))


def albumentations_outputs(params: AugmentParams, n: int, seed: int) -> np.ndarray:
    return augment.augment_batch(augment.train_transform(params, MEAN, STD, seed=seed), probes(n))


def decode(out: torch.Tensor | np.ndarray, params: AugmentParams) -> dict[str, np.ndarray]:
    """Crop offsets, flip and hole of each augmented probe, int (n,) arrays; asserts every output is exactly
    reflect-101 pad -> crop -> flip -> one cutout x cutout hole of FILL -> albumentations' normalisation."""
    pixels = to_pixels(out)  # (n, crop, crop, 3)
    n, crop, pad, cutout = len(pixels), params.crop, params.pad, params.cutout
    hole = (pixels == FILL).all(axis=3)  # (n, crop, crop)
    # the hole is narrower than the crop, so the first or the last pixel of each row / column is the image's
    rows = np.where(hole[:, :, 0], pixels[:, :, -1, 0], pixels[:, :, 0, 0]) // 8  # source row of each output row
    cols = np.where(hole[:, 0, :], pixels[:, -1, :, 1], pixels[:, 0, :, 1]) // 8
    index = np.pad(np.arange(SIZE), pad, mode="reflect")  # source coordinate of each padded coordinate
    windows = np.stack([index[d : d + crop] for d in range(len(index) - crop + 1)])  # (offsets, crop)
    offsets = len(windows)
    match_y = (rows[:, None, :] == windows[None]).all(axis=2)  # (n, offsets)
    # columns: the plain windows, then the mirrored ones, so a match at k >= offsets is a flip of offset k - offsets
    match_x = (cols[:, None, :] == np.concatenate([windows, windows[:, ::-1]])[None]).all(axis=2)  # (n, 2 * offsets)
    assert (match_y.sum(1) == 1).all() and (match_x.sum(1) == 1).all(), "not a crop of the reflect-101 padded image"
    dy, dx, flip = match_y.argmax(1), match_x.argmax(1) % offsets, match_x.argmax(1) >= offsets

    has_hole = hole.any(axis=(1, 2))
    first = hole.reshape(n, -1).argmax(1)  # first hole pixel in row-major order: the top-left corner
    top, left = np.where(has_hole, first // crop, -1), np.where(has_hole, first % crop, -1)
    source = np.pad(probe_image().astype(int), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    ar = np.arange(crop)
    col_index = np.where(flip[:, None], dx[:, None] + crop - 1 - ar, dx[:, None] + ar)
    expected = source[(dy[:, None] + ar)[:, :, None], col_index[:, None, :]]  # (n, crop, crop, 3)
    hole_rows = (ar >= top[:, None]) & (ar < top[:, None] + cutout)  # (n, crop)
    hole_cols = (ar >= left[:, None]) & (ar < left[:, None] + cutout)
    expected[hole_rows[:, :, None] & hole_cols[:, None, :] & has_hole[:, None, None]] = FILL
    assert (pixels == expected).all(), "the output is not crop -> flip -> one cutout x cutout hole"
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    assert out.tobytes() == normalise(expected).tobytes(), "not normalised like albumentations"
    return {"dy": dy, "dx": dx, "flip": flip, "top": top, "left": left, "hole_pixels": hole.sum(axis=(1, 2))}


def assert_same_distribution(a: np.ndarray, b: np.ndarray, support: range) -> None:
    """Both samples take every value of `support` and nothing else, and their histograms agree (chi-square
    homogeneity test; at p < 0.001 a real difference, not chance, is by far the likelier explanation)."""
    counts = np.stack([np.bincount(v - support.start, minlength=len(support)) for v in (a, b)])
    assert counts.shape[1] == len(support), f"values outside {support}"
    assert (counts > 0).all(), f"a value of {support} never occurs: {counts.tolist()}"
    p_value = chi2_contingency(counts).pvalue
    assert p_value > 1e-3, f"histograms differ (p = {p_value:.2g}): {counts.tolist()}"


def assert_uniform(values: np.ndarray, support: range) -> None:
    """Every value of `support` equally likely (chi-square goodness of fit, p > 0.001)."""
    counts = np.bincount(values - support.start, minlength=len(support))
    assert len(counts) == len(support), f"values outside {support}"
    p_value = chisquare(counts).pvalue
    assert p_value > 1e-3, f"not uniform (p = {p_value:.2g}): {counts.tolist()}"


@pytest.fixture(scope="module")
def default_draws() -> tuple[dict, dict]:
    """Decoded choices of both backends, default params: (tensor, albumentations)."""
    params = AugmentParams()
    return decode(tensor_outputs(params, N, seed=0), params), decode(albumentations_outputs(params, N, 0), params)


def test_every_crop_offset_occurs_as_often_as_with_albumentations(default_draws):
    ours, reference = default_draws
    for axis in ("dy", "dx"):
        assert_same_distribution(ours[axis], reference[axis], range(0, 9))  # 0..2 * pad with pad = 4
        assert_uniform(ours[axis], range(0, 9))


def test_one_hole_of_cutout_size_inside_the_crop_placed_like_albumentations(default_draws):
    ours, reference = default_draws
    assert (ours["hole_pixels"] == 8 * 8).all()  # decode checked it is one 8 x 8 square of FILL
    for axis in ("top", "left"):
        assert_same_distribution(ours[axis], reference[axis], range(0, 32 - 8 + 1))  # wholly inside the crop
        assert_uniform(ours[axis], range(0, 25))


def test_choices_are_independent_of_each_other(default_draws):
    ours, _ = default_draws
    # one choice must tell nothing about another: e.g. one draw reused for both crop axes would put every crop on
    # the diagonal; chi-square test of independence on each pair's contingency table (hole positions in 5 bins)
    choices = {**ours, "top": ours["top"] // 5, "left": ours["left"] // 5, "flip": ours["flip"].astype(int)}
    for a, b in [("dy", "dx"), ("dy", "flip"), ("dx", "flip"), ("top", "left"), ("dy", "top"), ("left", "flip")]:
        table = np.zeros((choices[a].max() + 1, choices[b].max() + 1))
        np.add.at(table, (choices[a], choices[b]), 1)
        p_value = chi2_contingency(table).pvalue
        assert p_value > 1e-3, f"{a} and {b} depend on each other (p = {p_value:.2g})"


@pytest.mark.parametrize("flip_p", [0.0, 0.2, 0.5, 1.0])
def test_flip_rate_is_flip_p_like_albumentations(flip_p):
    params, n = AugmentParams(flip_p=flip_p), 1000
    ours = decode(tensor_outputs(params, n, seed=1), params)["flip"].sum()
    reference = decode(albumentations_outputs(params, n, seed=1), params)["flip"].sum()
    sigma = np.sqrt(n * flip_p * (1 - flip_p))  # 0 at p = 0 and p = 1: the rate must then be exact
    assert abs(ours - n * flip_p) <= 5 * sigma
    assert abs(ours - reference) <= 5 * np.sqrt(2) * sigma


def test_hole_holds_the_same_bytes_as_albumentations():
    params = AugmentParams(pad=0, flip_p=0.0)  # only the hole moves
    ours = tensor_outputs(params, 50, seed=2).numpy()
    reference = albumentations_outputs(params, 50, seed=2)
    values = [
        np.unique(out.transpose(1, 0, 2, 3)[:, (to_pixels(out) == FILL).all(axis=3)], axis=1)
        for out in (ours, reference)
    ]  # (3 channels, distinct values) inside the holes
    assert values[0].shape == (3, 1) and values[0].tobytes() == values[1].tobytes()
    expected = (np.array(FILL) - np.array(MEAN)) / np.array(STD)  # ~0: the hole carries no signal
    np.testing.assert_allclose(values[0][:, 0], expected, atol=1e-6)  # float32 of a difference near 0


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_padding_is_reflect_101_byte_for_byte(flip_p):
    # crop = the whole padded image and a certain flip: nothing random is left, so the backends must agree exactly
    params = AugmentParams(pad=4, crop=40, flip_p=flip_p, cutout=0)
    images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    ours = TensorAugment(params, MEAN, STD)(to_nchw(images), torch.Generator().manual_seed(0)).numpy()
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")  # numpy's "reflect" is reflect-101
    expected = normalise(padded[:, :, ::-1] if flip_p else padded)
    assert ours.tobytes() == expected.tobytes()
    assert ours.tobytes() == augment.augment_batch(augment.train_transform(params, MEAN, STD, seed=0), images).tobytes()


def test_each_output_is_what_its_draws_say():
    params, n = AugmentParams(), 500
    augmenter = TensorAugment(params, MEAN, STD)
    draws = augmenter.draw(n, torch.Generator().manual_seed(3))
    decoded = decode(augmenter.apply(to_nchw(probes(n)), draws), params)
    for name in Draws._fields:
        np.testing.assert_array_equal(decoded[name], getattr(draws, name).numpy(), err_msg=name)
    # __call__ is draw + apply with the same generator stream
    same = augmenter(to_nchw(probes(n)), torch.Generator().manual_seed(3))
    assert same.numpy().tobytes() == augmenter.apply(to_nchw(probes(n)), draws).numpy().tobytes()


def test_same_seed_same_bytes_different_seed_different():
    images = to_nchw(np.random.default_rng(2).integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8))
    augmenter = TensorAugment(AugmentParams(), MEAN, STD)

    def run(seed: int) -> bytes:
        return augmenter(images, torch.Generator().manual_seed(seed)).numpy().tobytes()

    assert run(7) == run(7)
    assert run(7) != run(8)
    generator = torch.Generator().manual_seed(7)
    first, second = augmenter(images, generator), augmenter(images, generator)  # the stream moves on per call
    assert first.numpy().tobytes() == run(7) and second.numpy().tobytes() != run(7)


def test_output_is_normalised_float32_nchw_on_the_input_device_whatever_the_layout():
    images = np.random.default_rng(4).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    untouched = images.copy()
    for params in (AugmentParams(), AugmentParams(pad=0, cutout=0), AugmentParams(pad=2, crop=34, cutout=5)):
        augmenter = TensorAugment(params, MEAN, STD)
        nchw = augmenter(to_nchw(images), torch.Generator().manual_seed(5))
        nhwc = augmenter(torch.from_numpy(images), torch.Generator().manual_seed(5))
        assert nchw.shape == (16, 3, params.crop, params.crop) and nchw.dtype == torch.float32
        assert nchw.device.type == "cpu" and nchw.is_contiguous()
        assert torch.equal(nchw, nhwc)
    np.testing.assert_array_equal(images, untouched)  # the caller's images are never written to
    assert to_nchw(images).shape == (16, 3, SIZE, SIZE) and to_nchw(images).is_contiguous()
    with pytest.raises(ValueError, match="uint8"):
        augmenter(torch.from_numpy(images).float(), torch.Generator())
    with pytest.raises(ValueError, match="augment.crop"):
        TensorAugment(AugmentParams(pad=0, crop=34), MEAN, STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_bytes_with_a_cpu_generator():
    images = to_nchw(np.random.default_rng(6).integers(0, 256, (256, SIZE, SIZE, 3), dtype=np.uint8))
    augmenter = TensorAugment(AugmentParams(), MEAN, STD)
    on_gpu = augmenter(images.cuda(), torch.Generator().manual_seed(9))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert torch.equal(on_gpu.cpu(), augmenter(images, torch.Generator().manual_seed(9)))
    # a CUDA generator (the fast path's) draws other choices, but each output is still exactly a valid augmentation
    on_gpu = augmenter(to_nchw(probes(256)).cuda(), torch.Generator(device="cuda").manual_seed(9))
    drawn = decode(on_gpu, AugmentParams())
    assert 0.35 < drawn["flip"].mean() < 0.65 and len(np.unique(drawn["dy"])) == 9


@pytest.mark.parametrize(
    "params",
    [AugmentParams(pad=0, flip_p=0.0, cutout=0), AugmentParams(pad=4, flip_p=0.0, cutout=0)],
    ids=["no-pad", "no-cutout"],
)
def test_zero_pad_or_cutout_turns_the_step_off(params):
    draws = decode(tensor_outputs(params, 300, seed=4), params)
    assert (draws["hole_pixels"] == 0).all()
    if params.pad == 0:  # a 32 crop of the unpadded image: the image itself
        assert (draws["dy"] == 0).all() and (draws["dx"] == 0).all()
    else:
        reference = decode(albumentations_outputs(params, 300, seed=4), params)
        assert_same_distribution(draws["dy"], reference["dy"], range(0, 9))


def test_other_sizes_keep_the_same_rules():
    params = AugmentParams(pad=2, crop=34, flip_p=0.5, cutout=5)
    ours = decode(tensor_outputs(params, 600, seed=5), params)  # decode checks each one exactly
    reference = decode(albumentations_outputs(params, 600, seed=5), params)
    assert_same_distribution(ours["dx"], reference["dx"], range(0, 3))  # 36 - 34 + 1 offsets
    assert_same_distribution(ours["left"], reference["left"], range(0, 34 - 5 + 1))
    assert (ours["hole_pixels"] == 5 * 5).all()


def test_normalize_is_the_test_transform():
    images = np.random.default_rng(1).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    ours = TensorAugment(AugmentParams(), MEAN, STD).normalize(torch.from_numpy(images))
    reference = augment.augment_batch(augment.test_transform(MEAN, STD), images)
    assert ours.numpy().tobytes() == reference.tobytes()
    assert normalise(images).tobytes() == reference.tobytes()  # the tests' own normalisation is albumentations'


def test_a_dataset_stored_padded_gives_the_same_bytes_as_padding_each_batch():
    """Training keeps its dataset padded once (`store`); a batch from it augments exactly like the raw images."""
    images = np.random.default_rng(3).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    augmenter = TensorAugment(AugmentParams(), (125.0, 123.0, 114.0), (63.0, 62.0, 66.0))
    stored = augmenter.store(images)
    assert stored.shape == (64, 3, 40, 40) and stored.dtype == torch.uint8
    fresh = augmenter(to_nchw(images), torch.Generator().manual_seed(5))
    from_store = augmenter(stored, torch.Generator().manual_seed(5), padded=True)
    assert torch.equal(fresh, from_store)
    with pytest.raises(ValueError, match="expected 40x40 images"):
        augmenter(to_nchw(images), torch.Generator(), padded=True)
