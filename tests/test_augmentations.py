"""Each augmentation against torchvision's own transform with the same parameters: exactly (within
one grey level, from float rounding) where the operation is deterministic, statistically where it
is random. The per-image kernels and `augment_batch` are called directly: no loader to compile."""

import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop as TVRandomResizedCrop

import ffcv_ssl_common as C
from conftest import photos


@pytest.fixture(scope="module")
def images():
    """Four real photos at 64 x 64, uint8 HWC."""
    return np.stack(photos(64))


def tv(img, fn, *args):
    """Apply a torchvision functional to one HWC uint8 numpy image, back to HWC uint8."""
    out = fn(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), *args)
    return out.permute(1, 2, 0).numpy()


def ours(img, fn, *args):
    out = img.copy()
    fn(out, *args)
    return out


def assert_close(a, b, max_off=1, max_share=0.01):
    """Equal up to one grey level on at most 1% of the values (float32 rounding differences)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= max_off, f"max difference {diff.max()}"
    assert (diff > 0).mean() <= max_share, f"{(diff > 0).mean():.2%} of values differ"


def exact_blend(img, other, factor):
    """torchvision's _blend, factor * img + (1 - factor) * other with both weights rounded to
    float32 as torchvision rounds them, computed exactly in float64 (each product of a float32
    weight and an integer or float32 value is exact there, and so is the sum), clamped."""
    r, s = np.float64(np.float32(factor)), np.float64(np.float32(1.0 - factor))
    return np.clip(r * img.astype(np.float64) + s * np.asarray(other, np.float64), 0, 255)


def assert_equal_but_at_ties(a, b, exact):
    """a and b (uint8) may differ only where the exact value is within float32 rounding of an
    integer: there truncating a float32 result can go either way, and which way depends on how
    the float arithmetic was compiled (fused multiply-adds or not), in torchvision as in ours.
    Everywhere else they must be equal. A bound that holds on every CPU."""
    diff = np.abs(a.astype(int) - b.astype(int))
    tie = np.abs(exact - np.round(exact)) < 1e-4
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert not (diff[~tie]).any(), f"{(diff[~tie] > 0).sum()} differences away from a tie"


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4, 2.5])
def test_brightness_contrast_saturation_match_torchvision(images, factor):
    for img in images:
        gray = tv(img, TF.rgb_to_grayscale, 1).astype(np.float64)  # (H, W, 1) uint8 luma
        mean = np.float32(gray.mean())  # float32 as torchvision's; exact: a multiple of 1/4096
        for fn, ref, other in ((C.adjust_brightness_, TF.adjust_brightness, 0.0),
                               (C.adjust_contrast_, TF.adjust_contrast, mean),
                               (C.adjust_saturation_, TF.adjust_saturation, gray)):
            exact = exact_blend(img, other, factor)
            mine, theirs = ours(img, fn, factor), tv(img, ref, factor)
            assert_equal_but_at_ties(mine, theirs, exact)
            assert_equal_but_at_ties(mine, np.floor(exact).astype(np.uint8), exact)


# One script, run in fresh processes with a private numba cache, in both compile orders.
COMPILE_ORDER = r"""
import os, sys, numba, numpy as np
sys.path[:0] = [os.path.dirname(sys.argv[2]), sys.argv[2]]
import ffcv_ssl_common as C
from conftest import photos
images = np.stack(photos(32))
idx = np.arange(len(images), dtype=np.uint64)
seed = np.uint64(7)
jobs = {"jitter": (C.JITTER, [1.0, 0.4, 0.4, 0.4, 0.1]), "blur": (C.BLUR, [1.0, 5, 0.1, 2.0]),
        "gray": (C.GRAYSCALE, [1.0]), "noise": (C.NOISE, [1.0, 0.1]), "flip": (C.FLIP, [1.0]),
        "solarize": (C.SOLARIZE, [1.0, 128]), "saturation_only": (C.JITTER, [1.0, 0, 0, 0.4, 0])}

def through_ffcv():  # as an ffcv pipeline compiles us: fastmath=True, error_model numpy
    out = {}
    for name, (kind, consts) in jobs.items():
        consts = np.array(consts, np.float64)
        @numba.njit(fastmath=True, error_model="numpy")
        def wrapper(images, dst, idx):
            return C.augment_batch(np.array([kind]), images, dst, idx, np.array([seed]),
                                   consts[None])
        out["kernel_" + name] = wrapper(images, np.empty_like(images), idx).copy()
    return out

def standalone():
    out = {}
    for name, fn, arg in (("brightness", C.adjust_brightness_, 1.4),
                          ("contrast", C.adjust_contrast_, 1.4),
                          ("saturation", C.adjust_saturation_, 1.4),
                          ("hue", C.adjust_hue_, 0.23), ("blur", C.gaussian_blur_, (5, 1.3))):
        batch = images.copy()
        for img in batch:
            fn(img, *arg) if isinstance(arg, tuple) else fn(img, arg)
        out[name] = batch
    # the kernel's own factors, applied by the standalone functions
    key = np.uint64(C.batch_key(idx, seed))
    batch = images.copy()
    low = max(0.0, 1 - 0.4)  # the kernel's factor range for strength 0.4, computed as it does
    for i, img in enumerate(batch):
        C.adjust_saturation_(img, low + (1 + 0.4 - low) * C.uniform(np.uint64(C.sample_key(key, i)), 3))
    out["kernel_factors"] = batch
    return out

first, second = (through_ffcv, standalone) if sys.argv[1] == "ffcv-first" else (standalone, through_ffcv)
results = {}
for part in (first, second):
    results.update(part())
np.savez(sys.argv[3], **results)
"""


def test_same_pixels_whatever_compiled_first(tmp_path):
    """ffcv compiles pipelines with fastmath=True and numba hands that flag down to the functions
    it calls and caches them under the same key: before our kernels set fastmath=False
    themselves, a training run that compiled them first changed what a later standalone call
    returned (3.8% of saturation-1.4 values, on a Xeon), in that process and in every later one
    that loaded its cache. Now: identical in both orders (this test fails without the explicit
    flags), and the kernel equals the standalone function given the kernel's own random factor."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "order.py"
    script.write_text(COMPILE_ORDER)
    outputs = []
    for order, cache in (("ffcv-first", "a"), ("standalone-first", "b")):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / cache)}
        result = tmp_path / f"{len(outputs)}.npz"
        done = subprocess.run([sys.executable, str(script), order, here, str(result)],
                              cwd=os.path.dirname(here), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(np.load(result))
    for key in outputs[0].files:
        assert np.array_equal(outputs[0][key], outputs[1][key]), key
    assert np.array_equal(outputs[0]["kernel_saturation_only"], outputs[0]["kernel_factors"])


@pytest.mark.parametrize("hue", [-0.5, -0.2, -0.05, 0.0, 0.1, 0.33, 0.5])
def test_hue_matches_torchvision(images, hue):
    for img in images:
        assert_close(ours(img, C.adjust_hue_, hue), tv(img, TF.adjust_hue, hue))


def test_hue_actually_rotates_colours(images):
    # A guard against a no-op passing the test above: a real shift changes most pixels.
    img = images[1]  # coffee: saturated colours
    assert (ours(img, C.adjust_hue_, 0.3) != img).mean() > 0.5


def test_grayscale_matches_torchvision(images):
    for img in images:
        out = ours(img, C.to_grayscale_)
        assert np.array_equal(out, tv(img, TF.rgb_to_grayscale, 3))
        assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("threshold", [0, 64, 128, 200, 255])
def test_solarize_matches_torchvision(images, threshold):
    for img in images:
        assert np.array_equal(ours(img, C.solarize_, np.uint8(threshold)),
                              tv(img, TF.solarize, threshold))


@pytest.mark.parametrize("kernel_size,sigma", [(3, 0.5), (7, 1.0), (7, 2.0), (23, 5.0)])
def test_blur_matches_torchvision(images, kernel_size, sigma):
    for img in images:
        assert_close(ours(img, C.gaussian_blur_, kernel_size, sigma),
                     tv(img, TF.gaussian_blur, [kernel_size, kernel_size], [sigma, sigma]))


def test_blur_kernel_is_torchvisions():
    from torchvision.transforms._functional_tensor import _get_gaussian_kernel1d

    for k, s in [(3, 0.1), (9, 1.3), (23, 2.0)]:
        ref = _get_gaussian_kernel1d(k, s, torch.float32, torch.device("cpu")).numpy()
        np.testing.assert_allclose(C.gaussian_kernel1d(k, s), ref, rtol=1e-5, atol=1e-7)


def test_flip_matches_numpy(images):
    for img in images:
        assert np.array_equal(ours(img, C.hflip_), img[:, ::-1])


# ---- the random side: augment_batch, as the loader calls it ----
def run(kind, images, consts, seed=0, indices=None):
    indices = np.arange(len(images), dtype=np.uint64) if indices is None else indices
    dst = np.empty_like(images)
    return C.augment_batch(np.array([kind]), images, dst, indices, np.array([seed], np.uint64),
                           np.array([consts], np.float64))


def constant_batch(n, value=(100, 150, 200), side=8):
    return np.broadcast_to(np.array(value, np.uint8), (n, side, side, 3)).copy()


def test_a_chain_equals_its_operations_one_after_the_other(images):
    """AugmentChain (one pass per image, as the loaders run a view's operations) gives the pixels
    of the same operations applied one at a time over the batch, each with its own stream."""
    batch = np.concatenate([images] * 8)  # 32 photos: every operation fires on some, not others
    indices = np.arange(100, 100 + len(batch), dtype=np.uint64)
    ops = [C.RandomHorizontalFlip(0.5, seed=1), C.RandomColorJitter(0.4, 0.4, 0.4, 0.1, 0.8, seed=2),
           C.RandomGrayscale(0.2, seed=3), C.RandomGaussianBlur(7, (0.1, 2.0), 0.5, seed=4),
           C.RandomSolarization(128, 0.2, seed=5), C.GaussianNoise(0.1, 0.5, seed=6)]
    one_by_one = batch
    for op in ops:
        one_by_one = run(op.kind, one_by_one, op.consts, seed=op.seed, indices=indices).copy()
    chain = C.AugmentChain(ops[:3] + [C.AugmentChain(ops[3:])])  # nested chains flatten
    augment = chain.generate_code()  # the function ffcv compiles into the pipeline
    together = augment(batch, np.empty_like(batch), indices)
    assert np.array_equal(together, one_by_one)
    assert (together != batch).any(axis=(1, 2, 3)).mean() > 0.5  # not a no-op


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_probability_is_respected(p):
    n = 4000
    batch = constant_batch(n)
    out = run(C.GRAYSCALE, batch, [p])
    fired = (out != batch).any(axis=(1, 2, 3)).mean()
    assert abs(fired - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9  # 4 standard errors


def test_input_is_not_modified_and_output_is_a_copy():
    batch = constant_batch(64)
    before = batch.copy()
    out = run(C.SOLARIZE, batch, [1.0, 0])
    assert np.array_equal(batch, before)
    assert np.array_equal(out, 255 - before)


def test_brightness_factors_are_uniform_in_range():
    b = 0.4
    n = 4000
    batch = constant_batch(n, (100, 100, 100))
    out = run(C.JITTER, batch, [1.0, b, 0.0, 0.0, 0.0]).astype(np.float64)
    factors = out[:, 0, 0, 0] / 100.0
    assert factors.min() >= 1 - b - 0.01 and factors.max() <= 1 + b + 0.01
    assert factors.min() < 1 - b + 0.02 and factors.max() > 1 + b - 0.02  # the whole range is used
    assert abs(factors.mean() - 1.0) < 0.01
    assert abs(factors.std() - 2 * b / math.sqrt(12)) < 0.01  # uniform's standard deviation


def test_hue_shifts_cover_the_range():
    n, h = 2000, 0.1
    batch = constant_batch(n, (200, 60, 60), side=2)  # a saturated red: hue 0
    out = run(C.JITTER, batch, [1.0, 0.0, 0.0, 0.0, h])
    hues = []
    for img in out[:, 0, 0].astype(np.float64) / 255:
        r, g, b = img
        mx, mn = img.max(), img.min()
        hue = ((g - b) / (mx - mn) / 6) if mx == r else ((2 + (b - r) / (mx - mn)) / 6 if mx == g
                                                          else (4 + (r - g) / (mx - mn)) / 6)
        hues.append((hue + 0.5) % 1.0 - 0.5)
    hues = np.array(hues)
    assert hues.min() >= -h - 0.01 and hues.max() <= h + 0.01
    assert hues.min() < -h + 0.02 and hues.max() > h - 0.02
    assert abs(hues.mean()) < 0.01


def test_jitter_order_is_random():
    # Each output must be torchvision's brightness-then-contrast or contrast-then-brightness with
    # the image's own factors, and both orders must occur.
    img = photos(32)[0]
    n = 400
    batch = np.broadcast_to(img, (n, *img.shape)).copy()
    out = run(C.JITTER, batch, [1.0, 0.5, 0.5, 0.0, 0.0], seed=3)
    key = np.uint64(C.batch_key(np.arange(n, dtype=np.uint64), np.uint64(3)))
    orders = set()
    for i in range(n):
        k = np.uint64(C.sample_key(key, i))  # numba hands back a Python int
        fb, fc = 0.5 + 1.0 * C.uniform(k, 1), 0.5 + 1.0 * C.uniform(k, 2)
        b_first = tv(tv(img, TF.adjust_brightness, fb), TF.adjust_contrast, fc)
        c_first = tv(tv(img, TF.adjust_contrast, fc), TF.adjust_brightness, fb)
        d_b = np.abs(out[i].astype(int) - b_first).max()
        d_c = np.abs(out[i].astype(int) - c_first).max()
        assert min(d_b, d_c) <= 1
        if d_b != d_c:
            orders.add(d_b < d_c)
    assert orders == {True, False}


def test_blur_sigma_range():
    # A single bright pixel: its blurred peak falls as sigma grows; the peaks must span what
    # sigma in [0.1, 2.0] gives, and nothing outside it.
    n, k = 3000, 9
    batch = np.zeros((n, 15, 15, 3), np.uint8)
    batch[:, 7, 7] = 255
    out = run(C.BLUR, batch, [1.0, k, 0.1, 2.0])
    peaks = out[:, 7, 7, 0].astype(int)

    def peak(sigma):
        g = C.gaussian_kernel1d(k, sigma)
        return round(255 * g[k // 2] ** 2)

    assert peaks.max() <= peak(0.1) and peaks.min() >= peak(2.0) - 1
    assert (peaks == peak(0.1)).any() or peaks.max() >= peak(0.3)
    assert peaks.min() <= peak(1.9)


def test_noise_statistics():
    n, std = 200, 0.05
    batch = constant_batch(n, (128, 128, 128), side=16)
    out = run(C.NOISE, batch, [1.0, std]).astype(np.float64) - 128
    assert abs(out.mean()) < 0.2
    assert abs(out.std() - std * 255) < 0.3
    # independent per pixel and channel: neighbours uncorrelated
    assert abs(np.corrcoef(out[..., 0].ravel(), out[..., 1].ravel())[0, 1]) < 0.02


def test_same_seed_same_batch_different_seed_or_batch_differs():
    batch = np.stack(photos(32) * 8)
    a = run(C.JITTER, batch, [0.8, 0.4, 0.4, 0.2, 0.1], seed=1)
    b = run(C.JITTER, batch, [0.8, 0.4, 0.4, 0.2, 0.1], seed=1)
    c = run(C.JITTER, batch, [0.8, 0.4, 0.4, 0.2, 0.1], seed=2)
    shuffled = np.arange(len(batch), dtype=np.uint64)[::-1].copy()  # other batch content
    d = run(C.JITTER, batch, [0.8, 0.4, 0.4, 0.2, 0.1], seed=1, indices=shuffled)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_uniform_and_normal_streams():
    keys = [np.uint64(C.sample_key(np.uint64(C.batch_key(np.arange(5, dtype=np.uint64), 0)), i))
            for i in range(50)]
    u = np.array([C.uniform(k, c) for k in keys for c in range(200)])
    z = np.array([C.normal_pair(k, c) for k in keys for c in range(200)])
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 0.03  # the pair is independent
    z = z.ravel()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert np.histogram(u, bins=10)[0].min() > 900  # 10k values: ~1000 per bin


def test_crop_boxes_follow_torchvisions_distribution():
    """Our box sampler and torchvision's get_params on a 200 x 100 image: same statistics of area
    and (log) aspect ratio, and the aspect ratio really varies (the FFCV-SSL fork's did not)."""
    H, W, n = 100, 200, 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    log_ratio = np.log(np.array(ratio))
    key = np.uint64(C.batch_key(np.arange(7, dtype=np.uint64), np.uint64(0)))
    ours_boxes = np.array([C.random_crop_box(np.uint64(C.sample_key(key, i)), H, W,
                                             np.array(scale), log_ratio) for i in range(n)])
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    tv_boxes = np.array([TVRandomResizedCrop.get_params(img, list(scale), list(ratio))
                         for _ in range(n)])
    for boxes in (ours_boxes, tv_boxes):
        i, j, h, w = boxes.T
        assert (i >= 0).all() and (j >= 0).all() and (i + h <= H).all() and (j + w <= W).all()
    a_ours = ours_boxes[:, 2] * ours_boxes[:, 3] / (H * W)
    a_tv = tv_boxes[:, 2] * tv_boxes[:, 3] / (H * W)
    r_ours = np.log(ours_boxes[:, 3] / ours_boxes[:, 2])
    r_tv = np.log(tv_boxes[:, 3] / tv_boxes[:, 2])
    assert abs(a_ours.mean() - a_tv.mean()) < 0.02
    assert abs(r_ours.mean() - r_tv.mean()) < 0.02 and abs(r_ours.std() - r_tv.std()) < 0.02
    assert r_ours.std() > 0.1  # aspect ratio jitter is real
    assert r_ours.min() < np.log(0.8) and r_ours.max() > np.log(1.25)


@pytest.mark.parametrize("H,W,scale,ratio", [
    (100, 100, (1.0, 1.0), (2.0, 3.0)),      # too wide for the image: 10 tries fail, clamp
    (300, 100, (0.9, 1.0), (1.5, 2.0)),      # a tall image asked for wide crops
    (100, 300, (0.95, 1.0), (0.2, 0.25)),    # a wide image asked for tall crops
    (120, 100, (1.0, 1.0), (0.5, 1.2)),      # the image's own ratio is in range: all of it
])
def test_crop_box_fallback_after_ten_tries_is_torchvisions(H, W, scale, ratio):
    """Where no try fits (the tries are then deterministic), both samplers fall back to the
    centre crop clamped to the ratio range: the very same box."""
    key = np.uint64(C.sample_key(C.batch_key(np.arange(3, dtype=np.uint64), np.uint64(1)), 0))
    ours = C.random_crop_box(key, H, W, np.array(scale), np.log(np.array(ratio)))
    theirs = TVRandomResizedCrop.get_params(torch.zeros(3, H, W), list(scale), list(ratio))
    assert tuple(int(v) for v in ours) == tuple(theirs)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="odd"):
        C.RandomGaussianBlur(4)
    with pytest.raises(ValueError, match="probability"):
        C.RandomGrayscale(1.5)
    with pytest.raises(ValueError, match="hue"):
        C.RandomColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="threshold"):
        C.RandomSolarization(300)


# (top, left, height, width) of the crop and the output side: shrinking by up to 18x, keeping the
# size, enlarging by up to 16x, non-square crops, boxes touching each border.
CROP_CASES = [((10, 20, 290, 310), 96), ((0, 0, 512, 512), 28), ((0, 0, 512, 512), 224),
              ((33, 40, 167, 83), 64), ((100, 50, 8, 8), 32), ((5, 7, 55, 33), 640),
              ((480, 490, 32, 22), 32), ((200, 300, 40, 40), 40), ((0, 100, 512, 60), 17)]


@pytest.mark.parametrize("box,side", CROP_CASES)
def test_crop_resampling_matches_torchvision(box, side):
    """The crop of every view and the evaluation centre crop: torchvision's resized_crop with
    antialias=True (bilinear, antialiased when shrinking) on the same pixels, within one grey
    level (its uint8 path rounds fixed-point sums; ours rounds float64 sums)."""
    img = photos(512)[1]  # a real photo, 512 x 512 x 3
    top, left, h, w = box
    out = np.zeros((side, side, 3), np.uint8)
    C.resize_crop_antialias(img, top, top + h, left, left + w, out)
    ref = tv(img, TF.resized_crop, top, left, h, w, [side, side], TF.InterpolationMode.BILINEAR,
             True)
    assert_close(out, ref, max_off=1, max_share=0.02)


def test_enlarged_crop_is_interpolated_not_repeated():
    """An 8-pixel ramp enlarged 4x: bilinear gives ~30 distinct values (OpenCV's INTER_AREA,
    which ffcv's decoder uses, repeats each pixel 4 times: 8 values)."""
    ramp = np.repeat(np.repeat((np.arange(8) * 32).astype(np.uint8)[None, :, None], 8, 0), 3, 2)
    out = np.zeros((32, 32, 3), np.uint8)
    C.resize_crop_antialias(np.ascontiguousarray(ramp), 0, 8, 0, 8, out)
    assert len(np.unique(out[0, :, 0])) >= 28
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # still a ramp


def test_antialias_weights_are_a_normalised_triangle():
    first, count, weights = C.antialias_weights(0.0, 100.0, 10)  # shrinking 10x: 10 px each side
    assert np.allclose(weights.sum(1), 1) and count.max() <= 21
    x = 5  # an inner output pixel: centre 55 in input coordinates, a symmetric triangle
    w = weights[x, :count[x]]
    assert np.allclose(w, w[::-1]) and np.argmax(w) in (count[x] // 2 - 1, count[x] // 2)
    first, count, weights = C.antialias_weights(0.0, 4.0, 8)  # enlarging: two neighbours, bilinear
    assert count.max() <= 3
    centre = (np.arange(8) + 0.5) / 2 - 0.5  # where each output pixel falls in input pixels
    got = np.array([(weights[x, :count[x]] * (first[x] + np.arange(count[x]))).sum()
                    for x in range(8)])
    assert np.allclose(got, np.clip(centre, 0, 3))


def test_bench_kernels_prints_a_row_per_kernel(capsys):
    """benchmarks/bench_kernels.py on a tiny view: one table row per kernel, with times measured
    for both sides (positive numbers), and a bad setting refused with one line."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    import bench_kernels

    threads = torch.get_num_threads()
    try:
        bench_kernels.main(bench_kernels.Args(resolutions=(16,), repeats=2))  # one thread
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 16 px")]
    assert len(rows) == 8
    for row in rows:
        ours, theirs = (float(v) for v in row.split("|")[3:5])
        assert ours >= 0 and theirs > 0
    with pytest.raises(SystemExit, match="repeats"):
        bench_kernels.main(bench_kernels.Args(repeats=0))
