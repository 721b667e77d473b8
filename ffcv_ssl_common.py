"""The FFCV multi-view pipeline and the SSL augmentations: the only code the method files share.

ffcv 1.0.2 decodes, crops and flips; it lacks hue, grayscale, blur, solarization and noise, and its
random operations are not reproducible. This module adds, as numba-compiled ffcv Operations:

    RandomColorJitter   brightness, contrast, saturation, hue; torchvision's factors and random order
    RandomGrayscale     ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
    RandomSolarization  x -> 255 - x where x >= threshold
    RandomGaussianBlur  separable Gaussian, sigma ~ U(sigma range), reflect padding
    GaussianNoise       additive N(0, std) per pixel (std in [0, 1] image units), for instance SimCLR
    RandomResizedCrop   ffcv's crop decoder with its boxes drawn reproducibly, resampled as
                        torchvision does (bilinear with antialiasing), not with OpenCV's INTER_AREA
    CenterCrop          the evaluation crop, resampled the same way
    AugmentChain        several of the above in one pass per image (how the loaders run a view's)

and loaders that yield `(view_1, ..., view_k, label)` or `(image, label)`:

    loader = make_ssl_loader("data/fashion-mnist_train.beton", simclr_views(32), batch_size=256)
    for x1, x2, y in loader: ...

Reproducibility: every random number is a hash of (the operation's seed, derived from the loader's
seed; the image indices of the batch; the image's slot; a counter), so the same seed gives the same
batches whatever the number of worker threads, and a shuffled loader gives new views every epoch.

Preview what a recipe does:  python ffcv_ssl_common.py --beton data/fashion-mnist_train.beton
"""

import atexit
import contextlib
import fcntl
import hashlib
import math
import os
import pickle
import queue
import weakref
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import llvmlite.binding
import numba
import numba.typed
import numpy as np
import torch
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.dispatcher import Dispatcher
from numba.core.serialize import dumps as numba_dumps

# ffcv's rgb_image module builds a numba typed Dict when imported (IMAGE_MODES, which ffcv only
# reads from Python), and the first typed Dict of a process compiles numba's dictionary code: 3 s
# of every start. A plain dict answers the same lookups.
numba.typed.Dict, _TypedDict = dict, numba.typed.Dict
try:
    import ffcv._libffcv
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.reader import Reader
    from ffcv.traversal_order import QuasiRandom
    from ffcv.transforms import (ModuleWrapper, NormalizeImage, Squeeze, ToDevice, ToTensor,
                                 ToTorchImage)
finally:
    numba.typed.Dict = _TypedDict

# ImageNet statistics in 0-255 units; every method file normalises with these unless told otherwise.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255

# Our compiled code is kept on disk (__pycache__, or $NUMBA_CACHE_DIR): a new process loads it
# instead of compiling again, which is most of what makes a loader's first batch slow.
# fastmath=False and error_model, set explicitly: ffcv compiles its pipelines with fastmath=True,
# numba passes an unset flag on to every function called from there, and its on-disk cache does
# not key on flags. Left unset, whichever program compiled a kernel first decided whether it had
# fused multiply-adds (a*b + c*d rounded once instead of three times), and the same call then gave
# other pixels in a later process: 3.8% of the values of saturation 1.4 moved by one grey level
# on a Xeon (AVX-512) after a training run had compiled the kernels. Set, the code is the same
# whatever compiled it first (tests/test_augmentations.py checks both orders).
_NUMBA_FLAGS = dict(nogil=True, fastmath=False, error_model="numpy")


class _SharedCacheFile(IndexDataCacheFile):
    """numba's cache file (one index per function, one data file per compiled version), made safe
    for processes that compile at the same time: several trainings started together, DDP ranks.

    numba's own `save` reads the index, takes the first free data file number, writes the index,
    then the data: two processes adding different versions at once take the same number, and the
    index can end up pointing at the other version's machine code: a crash ("'descr' is NULL") or,
    silently, another setting's augmentation (tests/test_numba_cache.py: 20-30% of the entries
    wrong with four processes). Here a data file's name is a hash of its key and of the source
    file's stamp, so it only ever holds that version, and it is complete (written under a temporary
    name, then renamed) before the index names it. The index is updated under a file lock, so no
    process drops another's entry; without working locks (some network file systems) an entry can
    be lost, never mixed up, and that version is compiled again."""

    def save(self, key, data):
        digest = hashlib.sha256(numba_dumps((self._source_stamp, key))).hexdigest()[:24]
        name = self._data_name_pattern.replace("{number:d}", digest)
        self._save_data(name, data)
        with open(self._index_path + ".lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            overloads = self._load_index()
            if not overloads:  # a new index: the files of an older source stamp are dead
                for stale in self._stale_data_names():
                    with contextlib.suppress(OSError):
                        os.remove(self._data_path(stale))
            overloads[key] = name
            self._save_index(overloads)

    def _stale_data_names(self):
        try:
            with open(self._index_path, "rb") as f:  # as numba writes it: version, (stamp, index)
                version = pickle.load(f)
                stamp, overloads = pickle.loads(f.read())
        except Exception:  # no index, or one numba cannot read: nothing known to remove
            return []
        return list(overloads.values()) if (version, stamp) != (self._version,
                                                                  self._source_stamp) else []


class _SharedCache(FunctionCache):
    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _SharedCacheFile(self._cache_path, self._impl.filename_base,
                                            self._impl.locator.get_source_stamp())


def _njit(py_func=None, signature=None, parallel=False):
    """numba.njit with our flags and the on-disk cache above (what cache=True does, with
    _SharedCacheFile instead of numba's file). Use as @_njit, or _njit(f, signature, parallel)."""
    if py_func is None:
        return lambda f: _njit(f, signature, parallel)
    compiled = numba.njit(signature, parallel=parallel, **_NUMBA_FLAGS)(py_func)
    compiled._cache = _SharedCache(py_func)  # numba's Dispatcher.enable_caching, our cache class
    return compiled


def _cached(code):
    """Marks the function an Operation hands to ffcv: ffcv compiles it anew in every process
    (0.5-3 s per operation, most of a loader's first batch), our Compiler.compile (below, with
    the loaders) compiles it with _njit's disk cache. numba keys the cache on the closure's
    values, so they must be plain numbers and arrays; functions it calls must be module-level: a
    compiled function in a closure is a new object in every process, and would miss the cache."""
    for cell in code.__closure__ or ():
        assert not isinstance(cell.cell_contents, Dispatcher), (code, cell.cell_contents)
    code.cacheable = True
    return code


# ffcv's C++ decoder (libjpeg-turbo, with a crop window and 1/2-1/8 scales), declared by its
# symbol: ffcv's ctypes wrapper puts the function's address into the machine code, which numba
# cannot cache. The C bool arguments (enable_crop, hflip) are passed as uint8 0 / 1.
llvmlite.binding.load_library_permanently(ffcv._libffcv.__file__)
_U32 = numba.types.uint32
imdecode = numba.types.ExternalFunction("imdecode", numba.types.int32(
    numba.types.voidptr, numba.types.uint64, _U32, _U32,  # JPEG bytes, size, height, width
    numba.types.voidptr, _U32, _U32, _U32, _U32,  # output, crop height, width, x, y
    _U32, _U32, numba.types.uint8, numba.types.uint8))  # scale num, denom, enable_crop, hflip
JPG = 0  # ffcv's IMAGE_MODES["jpg"]: the `mode` of an image stored as a JPEG


def read_sample(address, state):
    """The stored bytes of the sample at `address`, from a loader's memory state: ffcv's
    memory_read, as a module-level function that cached code can call (ffcv compiles its own
    anew in every process)."""
    raise NotImplementedError("numba only")


@numba.extending.overload(read_sample)
def _read_sample(address, state):
    if len(state) == 3:  # os_cache=True: (the file's bytes, sample addresses, sample sizes)
        def read(address, state):
            size = state[2][np.searchsorted(state[1], address)]
            return state[0][address:address + size]
    else:  # os_cache=False: (pages in memory, sample addresses, sizes, page -> memory slot)
        def read(address, state):
            size = state[2][np.searchsorted(state[1], address)]
            page_size = np.uint64(state[0].shape[1])
            page = address // page_size
            offset = address - page * page_size
            return state[0][state[3][page], offset:offset + size]
    return read


# ----------------------------------------------------------------------------------------------
# Random numbers. ffcv's own random ops draw from numba's per-thread generators, so their output
# depends on which worker thread handles which image, and ffcv runs the operations of different
# views in an order that changes from one Loader to the next. We use a counter-based generator
# instead: every number is a hash of (operation seed, the batch's image indices, slot in batch,
# counter). Same seed and same batch give the same views, whatever the threads or the op order;
# a shuffled loader puts different images together every epoch, so the views change each epoch.
# ----------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@_njit
def _mix(z):
    # splitmix64's finaliser (Steele et al. 2014): a bijective, well-mixing hash of 64 bits.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@_njit
def batch_key(batch_indices, seed):
    """A 64-bit key for this operation (seed) and this batch (its image indices, in order)."""
    key = _mix(np.uint64(seed) + _GOLDEN)
    for index in batch_indices:
        key = _mix(key ^ np.uint64(index))
    return key


@_njit
def sample_key(key, slot):
    # np.uint64(key): a key that comes back from Python may be typed int64, and numba turns
    # int64 + uint64 into float64.
    return _mix(np.uint64(key) + (np.uint64(slot) + np.uint64(1)) * _GOLDEN)


@_njit
def uniform(key, counter):
    """The counter-th number of stream `key`, uniform in [0, 1) with 53 random bits."""
    return np.float64(_mix(np.uint64(key) + np.uint64(counter) * _GOLDEN) >> np.uint64(11)) * (
        1.0 / 2**53)


@_njit
def normal_pair(key, counter):
    """Two independent standard normal numbers (Box-Muller on two uniforms of the stream)."""
    u1 = 1.0 - uniform(key, 2 * counter)  # in (0, 1]: log(u1) is finite
    u2 = uniform(key, 2 * counter + 1)
    radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    return radius * np.cos(angle), radius * np.sin(angle)


@_njit
def random_crop_box(key, height, width, scale, log_ratio):
    """torchvision's RandomResizedCrop.get_params: up to 10 tries of area ~ U(scale) * image area
    and log aspect ~ U(log_ratio); then a centre crop clamped to the ratio range."""
    area = height * width
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 4 * t))
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, 4 * t + 1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(key, 4 * t + 2) * (height - h + 1))
            j = int(uniform(key, 4 * t + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < np.exp(log_ratio[0]):
        w, h = width, int(round(width / np.exp(log_ratio[0])))
    elif in_ratio > np.exp(log_ratio[1]):
        h, w = height, int(round(height * np.exp(log_ratio[1])))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@_njit
def negative_patch_box(key, anchor_box, height, width):
    """A box the size of `anchor_box` (i, j, h, w) elsewhere in the image: uniform over the
    positions where it does not overlap the anchor; when there are none (the anchor is too large
    or too central), the position farthest from it, which overlaps it least."""
    ai, aj, h, w = anchor_box
    rows, cols = height - h + 1, width - w + 1  # possible top-left corners
    # Corners whose box overlaps the anchor form the rectangle [r0, r1) x [c0, c1).
    r0, r1 = max(0, ai - h + 1), min(rows, ai + h)
    c0, c1 = max(0, aj - w + 1), min(cols, aj + w)
    free = rows * cols - (r1 - r0) * (c1 - c0)
    if free <= 0:
        i = 0 if ai >= rows - 1 - ai else rows - 1
        j = 0 if aj >= cols - 1 - aj else cols - 1
        return i, j, h, w
    r = int(uniform(key, 0) * free)  # the r-th free corner, row by row
    for i in range(rows):
        blocked = c1 - c0 if r0 <= i < r1 else 0
        if r < cols - blocked:
            j = r if r < c0 or blocked == 0 else r + blocked
            return i, j, h, w
        r -= cols - blocked
    return rows - 1, cols - 1, h, w  # not reached


# ----------------------------------------------------------------------------------------------
# Per-image kernels. Each works in place on one (H, W, 3) uint8 image and rounds like torchvision's
# tensor functional on uint8 input (blends truncate, blur rounds), so tests can compare them exactly.
# ----------------------------------------------------------------------------------------------
@_njit
def _luma(r, g, b):
    # torchvision: (0.2989 r + 0.587 g + 0.114 b).to(uint8), i.e. truncated, in float32.
    return np.uint8(np.float32(0.2989) * np.float32(r) + np.float32(0.587) * np.float32(g)
                    + np.float32(0.114) * np.float32(b))


@_njit
def _blend_value(x, y, ratio):
    # torchvision _blend: (ratio * x + (1 - ratio) * y).clamp(0, 255).to(uint8), in float32.
    v = np.float32(ratio) * np.float32(x) + np.float32(1.0 - ratio) * np.float32(y)
    return np.uint8(min(max(v, np.float32(0.0)), np.float32(255.0)))


@_njit
def adjust_brightness_(img, factor):
    flat = img.reshape(-1)  # every value of a C-contiguous (H, W, 3) image: a vectorised loop
    for i in range(flat.size):
        flat[i] = _blend_value(flat[i], 0.0, factor)


@_njit
def adjust_contrast_(img, factor):
    # The lumas are integers, summed as int64: exact, and vectorised (numba keeps a float sum in
    # order without fastmath, one addition at a time): 112 px, 39 -> 12 us on one core.
    h, w, _ = img.shape
    flat = img.reshape(h, w * 3)
    total = 0
    for y in range(h):
        row = flat[y]
        for x in range(w):
            total += np.int64(_luma(row[3 * x], row[3 * x + 1], row[3 * x + 2]))
    mean = np.float32(total / (h * w))  # mean of the (truncated) grayscale image
    values = img.reshape(-1)
    for i in range(values.size):
        values[i] = _blend_value(values[i], mean, factor)


@_njit
def adjust_saturation_(img, factor):
    h, w, _ = img.shape  # flat rows: 6x faster (112 px: 61 -> 10 us)
    flat = img.reshape(h, w * 3)
    for y in range(h):
        row = flat[y]
        for x in range(w):  # three statements, not a loop over k: 76 -> 11 us
            gray = _luma(row[3 * x], row[3 * x + 1], row[3 * x + 2])
            row[3 * x] = _blend_value(row[3 * x], gray, factor)
            row[3 * x + 1] = _blend_value(row[3 * x + 1], gray, factor)
            row[3 * x + 2] = _blend_value(row[3 * x + 2], gray, factor)


@_njit
def adjust_hue_(img, hue_factor):
    # RGB -> HSV -> shift H -> RGB per pixel in float32, as torchvision's _rgb2hsv/_hsv2rgb, with
    # the same operations in the same order (the same bits: tests compare with torchvision).
    # Written without branches, one row at a time, so that LLVM vectorises the loops: each choice
    # (which channel is the max, which of the six hue sectors) is a select, as torchvision's
    # masks are. 2.7x faster than one pixel at a time with if/elif (260 -> 95 us for 112 px).
    h_, w_, _ = img.shape
    one, zero, six = np.float32(1.0), np.float32(0.0), np.float32(6.0)
    factor = np.float32(hue_factor)
    r, g, b = np.empty(w_, np.float32), np.empty(w_, np.float32), np.empty(w_, np.float32)
    for y in range(h_):
        row = img[y]
        for x in range(w_):
            r[x] = np.float32(row[x, 0]) / np.float32(255.0)
            g[x] = np.float32(row[x, 1]) / np.float32(255.0)
            b[x] = np.float32(row[x, 2]) / np.float32(255.0)
        for x in range(w_):
            rx, gx, bx = r[x], g[x], b[x]
            maxc = rx if rx > gx else gx
            maxc = maxc if maxc > bx else bx
            minc = rx if rx < gx else gx
            minc = minc if minc < bx else bx
            grey = maxc == minc  # no hue: the round trip gives the pixel back (kept below)
            cr = maxc - minc
            s = cr / (one if grey else maxc)
            crd = one if grey else cr
            rc, gc, bc = (maxc - rx) / crd, (maxc - gx) / crd, (maxc - bx) / crd
            hr = bc - gc if maxc == rx else zero
            hg = np.float32(2.0) + rc - bc if (maxc == gx) & (maxc != rx) else zero
            hb = np.float32(4.0) + gc - rc if (maxc != gx) & (maxc != rx) else zero
            hue = (hr + hg + hb) / six + one  # in [5/6, 2): fmod(., 1) is one subtraction
            hue = hue - one if hue >= one else hue
            hue = hue + factor  # then floor-mod 1, as torch's % on floats
            hue = hue + one if hue < zero else hue
            hue = hue - one if hue >= one else hue
            i = np.float32(np.int32(hue * six))  # floor (hue * 6 >= 0); 6 only by rounding
            f = hue * six - i
            p = maxc * (one - s)
            q = maxc * (one - s * f)
            t = maxc * (one - s * (one - f))
            p = zero if p < zero else (one if p > one else p)
            q = zero if q < zero else (one if q > one else q)
            t = zero if t < zero else (one if t > one else t)
            # Sectors 0..5 (6 is 0): r = v q p p t v, g = t v v q p p, b = p p t v v q.
            ro = maxc if (i == zero) | (i >= np.float32(5.0)) else (
                q if i == one else (p if i < np.float32(4.0) else t))
            go = t if (i == zero) | (i >= six) else (
                maxc if i < np.float32(3.0) else (q if i == np.float32(3.0) else p))
            bo = p if (i < np.float32(2.0)) | (i >= six) else (
                t if i == np.float32(2.0) else (maxc if i < np.float32(5.0) else q))
            r[x] = rx if grey else ro
            g[x] = gx if grey else go
            b[x] = bx if grey else bo
        for x in range(w_):  # convert_image_dtype(float -> uint8): x 255.999, truncated
            row[x, 0] = np.uint8(r[x] * np.float32(255.999))
            row[x, 1] = np.uint8(g[x] * np.float32(255.999))
            row[x, 2] = np.uint8(b[x] * np.float32(255.999))


@_njit
def to_grayscale_(img):
    h, w, _ = img.shape  # 112 px: 21 -> 5 us with flat rows
    flat = img.reshape(h, w * 3)
    for y in range(h):
        row = flat[y]
        for x in range(w):
            gray = _luma(row[3 * x], row[3 * x + 1], row[3 * x + 2])
            row[3 * x], row[3 * x + 1], row[3 * x + 2] = gray, gray, gray


@_njit
def solarize_(img, threshold):
    flat = img.reshape(-1)  # one flat loop with a select: vectorised, 12-40x faster than 3-d if/else
    for i in range(flat.size):
        v = flat[i]
        flat[i] = np.uint8(255) - v if v >= threshold else v


@_njit
def gaussian_kernel1d(kernel_size, sigma):
    half = (kernel_size - 1) * 0.5
    kernel = np.empty(kernel_size, np.float32)
    for i in range(kernel_size):
        kernel[i] = np.exp(-0.5 * ((i - half) / sigma) ** 2)
    return kernel / kernel.sum()


@_njit
def _reflect(i, n):
    # torch's "reflect" padding: the edge pixel is not repeated (-1 -> 1, n -> n - 2).
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@_njit
def gaussian_blur_(img, kernel_size, sigma):
    # Separable (2k multiply-adds per pixel instead of k^2), and each pass runs along whole rows of
    # (x, channel) values so that LLVM vectorises it: a per-pixel reflect lookup in the inner loop
    # was 10x slower.
    kernel = gaussian_kernel1d(kernel_size, sigma)
    h, w, c = img.shape
    r = kernel_size // 2
    n = w * c
    padded = np.empty((w + 2 * r) * c, np.float32)  # one row, reflect-padded left and right
    rows = np.zeros((h, n), np.float32)  # after the horizontal pass
    for y in range(h):
        for x in range(w + 2 * r):
            src = _reflect(x - r, w)
            for k in range(c):
                padded[x * c + k] = img[y, src, k]
        for t in range(kernel_size):
            weight, offset = kernel[t], t * c
            for j in range(n):
                rows[y, j] += weight * padded[offset + j]
    acc = np.empty(n, np.float32)
    for y in range(h):
        acc[:] = 0.0
        for t in range(kernel_size):
            weight, src = kernel[t], rows[_reflect(y + t - r, h)]
            for j in range(n):
                acc[j] += weight * src[j]
        for x in range(w):
            for k in range(c):
                img[y, x, k] = np.uint8(min(max(np.round(acc[x * c + k]), 0.0), 255.0))


@_njit
def _add_clipped(value, noise):
    return np.uint8(min(max(np.round(np.float32(value) + np.float32(noise)), 0.0), 255.0))


@_njit
def add_gaussian_noise_(img, std, key):
    flat = img.reshape(-1)  # every pixel and channel of a C-contiguous (H, W, 3) image
    scale = std * 255.0
    for m in range(0, flat.size, 2):
        z0, z1 = normal_pair(key, 8 + m // 2)  # uniforms 0-15: left for p and other draws
        flat[m] = _add_clipped(flat[m], scale * z0)
        if m + 1 < flat.size:
            flat[m + 1] = _add_clipped(flat[m + 1], scale * z1)


# ----------------------------------------------------------------------------------------------
# One image, one augmentation, its random parameters drawn from the image's stream `key`.
# `consts` holds the operation's settings: [p, then the op's own].
# ----------------------------------------------------------------------------------------------
FLIP, JITTER, GRAYSCALE, BLUR, SOLARIZE, NOISE = range(6)


@_njit
def antialias_weights(start, length, out_size):
    """torchvision's resampling weights (F.interpolate(mode="bilinear", antialias=True,
    align_corners=False), the same triangle filter as PIL) for the input span [start, start +
    length) resized to out_size pixels: output pixel x averages the input pixels first[x] ..
    first[x] + count[x] - 1 (absolute indices, inside the span) with weights[x, :count[x]].
    Enlarging, this is plain bilinear interpolation; shrinking by s, the triangle widens to s
    pixels each side, so every input pixel counts (OpenCV's INTER_AREA instead repeats pixels when
    enlarging). `start` and `length` are whole numbers for a crop of the decoded image, and
    fractions when the JPEG was decoded at a reduced scale (jpeg_decode_plan)."""
    scale = length / out_size
    support = max(scale, 1.0)  # the triangle's half-width, in input pixels
    span_lo, span_hi = math.floor(start), math.ceil(start + length)
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, int(2 * support) + 3), np.float64)
    for x in range(out_size):
        center = start + (x + 0.5) * scale
        lo = max(math.floor(center - support + 0.5), span_lo)
        hi = min(math.floor(center + support + 0.5), span_hi)
        total = 0.0
        for k in range(hi - lo):
            w = max(0.0, 1.0 - abs((lo + k - center + 0.5) / support))
            weights[x, k] = w
            total += w
        for k in range(hi - lo):
            weights[x, k] /= total
        first[x], count[x] = lo, hi - lo
    return first, count, weights


@_njit
def resample_box(image, top, height, left, width, dst):
    """dst (H, W, 3 uint8) <- the box [top, top + height) x [left, left + width) of image (a
    C-contiguous (rows, cols, 3) uint8 array) resampled with antialias_weights, in float64 and
    rounded once at the end (torchvision rounds the same sums). Columns first: each output row
    is a weighted sum of whole input rows (a contiguous loop the compiler vectorises), then each
    output pixel of that row a weighted sum of its columns; the same sums as rows first."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    fx, cx, wx = antialias_weights(left, width, out_w)
    fy, cy, wy = antialias_weights(top, height, out_h)
    c0, c1 = fx[0], fx[0]
    for x in range(out_w):
        c1 = max(c1, fx[x] + cx[x])
    n = 3 * (c1 - c0)
    line = np.empty(n, np.float64)  # one output row, every input column it needs
    for y in range(out_h):
        line[:] = 0.0
        for k in range(cy[y]):
            w = wy[y, k]
            row = image[fy[y] + k].reshape(-1)[3 * c0:3 * c1]
            for i in range(n):
                line[i] += w * row[i]
        for x in range(out_w):
            r = g = b = 0.0
            base = 3 * (fx[x] - c0)
            for k in range(cx[x]):
                w = wx[x, k]
                r += w * line[base + 3 * k]
                g += w * line[base + 3 * k + 1]
                b += w * line[base + 3 * k + 2]
            dst[y, x, 0] = min(255, max(0, int(r + 0.5)))
            dst[y, x, 1] = min(255, max(0, int(g + 0.5)))
            dst[y, x, 2] = min(255, max(0, int(b + 0.5)))


@_njit
def resize_crop_antialias(image, i0, i1, j0, j1, dst):
    """dst <- image[i0:i1, j0:j1] resized as torchvision's resized_crop(antialias=True)."""
    resample_box(image, float(i0), float(i1 - i0), float(j0), float(j1 - j0), dst)


# Decoding only what the crops need. libjpeg-turbo (through ffcv's C++ imdecode) can
# (1) decode at 1/2, 1/4 or 1/8 scale: the inverse DCT makes fewer pixels, and the resampling
#     then has fewer to read. The scale is the smallest that keeps at least JPEG_SCALE_MARGIN
#     decoded pixels per output pixel, so the antialiased resize still does most of the
#     shrinking: within 0.3 grey levels on average of decoding everything for 64 px views of
#     300-500 px photos (margin 1.5: 0.5, margin 1: 1.05; tests/test_loader.py checks < 1);
# (2) cut the JPEG to a region before decoding it (tjTransform, TJXOPT_CROP: lossless, in the
#     compressed domain; the region's top-left corner on the 16-pixel MCU grid). Cutting must
#     still read all of the file's entropy-coded data and write the region's again: measured on
#     those photos (one core, Xeon), it saves 15% for a region of 8% of the image at full scale,
#     nothing at 1/2, and costs more than it saves above ~15% (2.4x the full decode for the whole
#     image). Hence JPEG_CROP_MAX_AREA. Most of the decoding time is the entropy decoding, which
#     neither trick avoids; what halves it for two views is decoding once (MultiViewCrop).
JPEG_MCU = 16  # MCU side of 4:2:0 JPEGs (OpenCV's and PIL's default); 8 for 4:4:4 divides it
JPEG_CROP_MAX_AREA = 0.1
JPEG_SCALE_MARGIN = 2.0


@_njit
def jpeg_decode_plan(boxes, height, width, out_h, out_w, crop_max_area, scale_margin):
    """What to decode of a height x width JPEG for the crop boxes (rows of i, j, h, w), each
    resized to out_h x out_w: (y0, x0, region_h, region_w, denom, cut): the top-left corner and
    size of the region holding every box (the whole image unless `cut`), decoded at 1/denom."""
    denom = 1
    min_h, min_w = boxes[:, 2].min(), boxes[:, 3].min()
    while (denom < 8 and min_h >= 2 * denom * scale_margin * out_h
           and min_w >= 2 * denom * scale_margin * out_w):
        denom *= 2
    i0, j0 = boxes[:, 0].min(), boxes[:, 1].min()
    i1, j1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    if (i1 - i0) * (j1 - j0) <= crop_max_area * height * width:
        y0, x0 = i0 // JPEG_MCU * JPEG_MCU, j0 // JPEG_MCU * JPEG_MCU
        return y0, x0, i1 - y0, j1 - x0, denom, True
    return 0, 0, height, width, denom, False


@_njit
def crop_boxes(image, boxes, y0, x0, denom, dst):
    """dst[v] <- box v (rows of i, j, h, w in the image's pixels) of `image`, which holds the
    image's region from (y0, x0) decoded at scale 1/denom."""
    for v in range(boxes.shape[0]):
        i, j, h, w = boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3]
        resample_box(image, (i - y0) / denom, h / denom, (j - x0) / denom, w / denom, dst[v])


RANDOM_BOX, CENTRE_BOX, NEGATIVE_BOX = 0, 1, 2


@_njit
def crop_box(kind, key, anchor_key, height, width, scale, log_ratio):
    """The decoders' crop (i, j, h, w): RANDOM_BOX, torchvision's RandomResizedCrop box;
    CENTRE_BOX, the centred square of side scale[0] x the short side; NEGATIVE_BOX, a patch the
    size of the anchor's random box (drawn from anchor_key) placed away from it."""
    if kind == CENTRE_BOX:
        side = int(scale[0] * min(height, width))
        return (height - side) // 2, (width - side) // 2, side, side
    if kind == NEGATIVE_BOX:
        anchor_box = random_crop_box(anchor_key, height, width, scale, log_ratio)
        return negative_patch_box(key, anchor_box, height, width)
    return random_crop_box(key, height, width, scale, log_ratio)


@_njit
def hflip_(img):
    # Pixels swapped within each row seen as flat bytes: 4x faster than 3-d indexing (140 -> 37
    # us for 224 px, one core).
    h, w, _ = img.shape  # 3 channels
    flat = img.reshape(h, w * 3)
    for y in range(h):
        row = flat[y]
        for x in range(w // 2):
            a, b = 3 * x, 3 * (w - 1 - x)
            r, g, bl = row[a], row[a + 1], row[a + 2]
            row[a], row[a + 1], row[a + 2] = row[b], row[b + 1], row[b + 2]
            row[b], row[b + 1], row[b + 2] = r, g, bl


@_njit
def _apply(kind, img, key, consts):
    if kind == FLIP:
        hflip_(img)
    elif kind == JITTER:  # consts: p, brightness, contrast, saturation, hue strengths
        b, c, s, h = consts[1], consts[2], consts[3], consts[4]
        factors = np.array([max(0.0, 1 - b) + (1 + b - max(0.0, 1 - b)) * uniform(key, 1),
                            max(0.0, 1 - c) + (1 + c - max(0.0, 1 - c)) * uniform(key, 2),
                            max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * uniform(key, 3),
                            -h + 2 * h * uniform(key, 4)])
        order = np.argsort(np.array([uniform(key, 5 + k) for k in range(4)]))  # a random permutation
        for op in order:
            if consts[1 + op] == 0:  # zero strength: torchvision leaves the adjustment out
                continue
            if op == 0:
                adjust_brightness_(img, factors[0])
            elif op == 1:
                adjust_contrast_(img, factors[1])
            elif op == 2:
                adjust_saturation_(img, factors[2])
            else:
                adjust_hue_(img, factors[3])
    elif kind == GRAYSCALE:
        to_grayscale_(img)
    elif kind == BLUR:  # consts: p, kernel size, sigma min, sigma max
        k = int(consts[1])
        if k // 2 < min(img.shape[0], img.shape[1]):  # reflect padding needs a margin
            gaussian_blur_(img, k, consts[2] + (consts[3] - consts[2]) * uniform(key, 1))
    elif kind == SOLARIZE:  # consts: p, threshold
        solarize_(img, np.uint8(consts[1]))
    elif kind == NOISE:  # consts: p, std
        add_gaussian_noise_(img, consts[1], key)


@_njit(parallel=True)
def augment_batch(kinds, images, dst, batch_indices, seeds, consts):
    """The parallel loop shared by every augmentation: copy each image, then apply operation j
    (kinds[j], settings consts[j], consts[j, 0] its probability), j in order, each with its own
    random stream (seeds[j]). One cached, compiled function serves all of them: compiling a
    parallel loop takes seconds, and ffcv would otherwise compile one per operation and per view,
    in every process. A view's operations in one call (AugmentChain) transform each image while it
    is in the core's cache, instead of passing over the whole batch once per operation."""
    n = images.shape[0]
    keys = np.empty(len(kinds), np.uint64)
    for j in range(len(kinds)):
        keys[j] = batch_key(batch_indices, seeds[j])
    for i in numba.prange(n):
        dst[i] = images[i]
        for j in range(len(kinds)):
            image_key = sample_key(keys[j], i)
            if uniform(image_key, 0) < consts[j, 0]:
                _apply(kinds[j], dst[i], image_key, consts[j])
    return dst[:n]


# ----------------------------------------------------------------------------------------------
# ffcv Operations. They write to their own output buffer instead of working in place: two views
# branching after one shared crop read the same input, and an in-place op in one branch would
# change the other.
# ----------------------------------------------------------------------------------------------
class _BatchOp(Operation):
    """Base of our augmentations: uint8 (B, H, W, 3) in, a new uint8 (B, H, W, 3) buffer out."""

    kind = -1

    def __init__(self, p: float, *settings: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: probability must be in [0, 1], got {p}")
        self.p, self.seed = p, seed
        self.consts = np.array([p, *settings], np.float64)

    def declare_state_and_memory(self, previous_state):
        if previous_state.shape[-1] != 3 or previous_state.dtype != np.uint8:
            raise TypeError(f"{type(self).__name__} needs uint8 (H, W, 3) images before ToTensor, "
                            f"got {previous_state.dtype} {previous_state.shape}")
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, np.uint8)

    def generate_code(self):
        return AugmentChain([self]).generate_code()


class RandomHorizontalFlip(_BatchOp):
    """Mirror left-right with probability p (ffcv's flip is not reproducible, see above)."""

    kind = FLIP

    def __init__(self, p=0.5, seed=0):
        super().__init__(p, seed=seed)


class RandomColorJitter(_BatchOp):
    """torchvision's `RandomApply([ColorJitter(b, c, s, h)], p)`: with probability p, the four
    adjustments in a random order, factors ~ U[max(0, 1 - x), 1 + x] (hue: U[-h, h]); a zero
    strength leaves that adjustment out, as torchvision does."""

    kind = JITTER

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, seed=0):
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            raise ValueError(f"jitter strengths must be >= 0 (hue in [0, 0.5]), got "
                             f"{brightness}, {contrast}, {saturation}, {hue}")
        super().__init__(p, brightness, contrast, saturation, hue, seed=seed)


class RandomGrayscale(_BatchOp):
    """torchvision's `RandomGrayscale(p)`: the luma copied to all three channels."""

    kind = GRAYSCALE

    def __init__(self, p=0.2, seed=0):
        super().__init__(p, seed=seed)


class RandomSolarization(_BatchOp):
    """torchvision's `RandomSolarize(threshold, p)` on uint8: pixels >= threshold become 255 - x."""

    kind = SOLARIZE

    def __init__(self, threshold=128, p=0.2, seed=0):
        if not 0 <= threshold <= 255:
            raise ValueError(f"solarization threshold must be a grey level 0-255, got {threshold}")
        super().__init__(p, threshold, seed=seed)


class RandomGaussianBlur(_BatchOp):
    """torchvision's `RandomApply([GaussianBlur(kernel_size, sigma)], p)`: sigma ~ U(sigma range)
    per image, reflect padding, rounded back to uint8."""

    kind = BLUR

    def __init__(self, kernel_size, sigma=(0.1, 2.0), p=0.5, seed=0):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 < min <= max, got {sigma}")
        super().__init__(p, kernel_size, sigma[0], sigma[1], seed=seed)


class GaussianNoise(_BatchOp):
    """Adds N(0, std^2) to every pixel and channel, std in [0, 1] image units (std=0.1 is about 25
    grey levels), then rounds and clips to uint8."""

    kind = NOISE

    def __init__(self, std=0.1, p=1.0, seed=0):
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        super().__init__(p, std, seed=seed)


class AugmentChain(_BatchOp):
    """Several of the operations above as one: each image goes through all of them in turn, with
    the same random draws and pixels as the operations one after the other (each keeps its seed),
    read and written once instead of once per operation. The loaders run each view's operations
    (ViewConfig.augmentations) this way."""

    def __init__(self, ops: Sequence[_BatchOp]):
        Operation.__init__(self)
        if not ops or not all(isinstance(op, _BatchOp) for op in ops):
            raise TypeError(f"AugmentChain needs one or more of our augmentations, got {ops}")
        self.ops = [o for op in ops for o in (op.ops if isinstance(op, AugmentChain) else [op])]

    def generate_code(self):
        kinds = np.array([op.kind for op in self.ops], np.int64)
        seeds = np.array([op.seed for op in self.ops], np.uint64)
        consts = np.zeros((len(self.ops), max(len(op.consts) for op in self.ops)), np.float64)
        for j, op in enumerate(self.ops):
            consts[j, :len(op.consts)] = op.consts

        def augment(images, dst, batch_indices):
            return augment_batch(kinds, images, dst, batch_indices, seeds, consts)

        augment.with_indices = True  # ffcv passes the batch's image indices: our random keys
        return _cached(augment)


def check_crop(scale, ratio) -> None:
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop scale must be in (0, 1] and ordered, ratio positive and "
                         f"ordered; got scale={scale}, ratio={ratio}")


class RandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """ffcv's RandomResizedCropRGBImageDecoder (decode, crop and resize in one pass), with the
    crop boxes drawn from our counter-based generator so that they can be reproduced, and the
    crop resampled as torchvision's RandomResizedCrop does (resize_crop_antialias)."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0,
                 partial_decode=True):
        super().__init__(output_size, scale, ratio)
        check_crop(scale, ratio)
        self.seed = seed
        self.anchor_seed = seed  # NegativePatchCrop: the seed of the crop to avoid
        # JPEGs: decode only the crop's region, at a reduced scale (jpeg_decode_plan); False
        # decodes every pixel (the exact reference).
        self.crop_max_area = JPEG_CROP_MAX_AREA if partial_decode else 0.0
        self.scale_margin = JPEG_SCALE_MARGIN if partial_decode else math.inf

    box_kind = RANDOM_BOX

    def generate_code(self):
        loop = Compiler.get_iterator()
        box_kind = self.box_kind
        scales, log_ratios = self.box_parameters()
        seeds, anchor_seed = self.view_seeds(), np.uint64(self.anchor_seed)
        n_views = len(seeds)
        out_h, out_w = self.output_size
        crop_max_area, scale_margin = self.crop_max_area, self.scale_margin

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            # One crop: (B, H, W, 3); MultiViewCrop: (B, V, H, W, 3). Either way, (B, V, H, W, 3).
            views = destination.reshape((destination.shape[0], n_views, out_h, out_w, 3))
            keys = np.empty(n_views, np.uint64)
            for v in range(n_views):
                keys[v] = batch_key(batch_indices, seeds[v])
            anchor_key = batch_key(batch_indices, anchor_seed)
            for k in loop(len(batch_indices)):
                field = metadata[batch_indices[k]]
                image_data = read_sample(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                boxes = np.empty((n_views, 4), np.int64)
                for v in range(n_views):
                    i, j, h, w = crop_box(box_kind, sample_key(keys[v], k),
                                          sample_key(anchor_key, k), int(height), int(width),
                                          scales[v], log_ratios[v])
                    boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3] = i, j, h, w
                if field["mode"] != JPG:
                    crop_boxes(image_data.reshape(height, width, 3), boxes, 0, 0, 1, views[k])
                    continue
                # Decode once for all the boxes, only what they need (jpeg_decode_plan).
                y0, x0, rh, rw, d, cut = jpeg_decode_plan(boxes, int(height), int(width), out_h,
                                                          out_w, crop_max_area, scale_margin)
                buffer = temp_storage[k]
                if cut and imdecode(image_data.ctypes, image_data.size, height, width,
                                    buffer.ctypes, rh, rw, x0, y0, 1, d, 1, 0) != 0:
                    cut = False  # e.g. a JPEG whose MCU is not on our grid: decode all of it
                if not cut:
                    y0, x0, rh, rw = 0, 0, int(height), int(width)
                    imdecode(image_data.ctypes, image_data.size, height, width, buffer.ctypes,
                             height, width, 0, 0, 1, d, 0, 0)
                sh, sw = (rh + d - 1) // d, (rw + d - 1) // d  # libjpeg rounds scaled sizes up
                crop_boxes(buffer[:3 * sh * sw].reshape(sh, sw, 3), boxes, y0, x0, d, views[k])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return _cached(decode)

    def view_seeds(self) -> np.ndarray:
        return np.array([self.seed], np.uint64)

    def box_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """Each view's crop scale and log aspect ratio range: two (V, 2) arrays."""
        return (np.array([self.scale], np.float64),
                np.log(np.array([self.ratio], np.float64)))


class CenterCrop(RandomResizedCrop):
    """The evaluation crop: the centred square of side int(crop_ratio x the short side), as
    ffcv's CenterCropRGBImageDecoder, resampled as torchvision's Resize (antialiased)."""

    box_kind = CENTRE_BOX

    def __init__(self, output_size, crop_ratio: float = 1.0, partial_decode=True):
        super().__init__(output_size, partial_decode=partial_decode)
        self.crop_ratio = crop_ratio

    def box_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        # crop_box's `scale` carries crop_ratio here.
        return (np.array([[self.crop_ratio, self.crop_ratio]], np.float64),
                np.zeros((1, 2), np.float64))


class NegativePatchCrop(RandomResizedCrop):
    """Another patch of the same image for instance SimCLR's negatives: the size of `anchor`'s
    crop (which it recomputes from the anchor's seed: nothing passes between pipelines), placed
    where it does not overlap that crop when the image allows (negative_patch_box)."""

    box_kind = NEGATIVE_BOX

    def __init__(self, anchor: RandomResizedCrop, seed: int):
        super().__init__(anchor.output_size, anchor.scale, anchor.ratio, seed)
        self.crop_max_area, self.scale_margin = anchor.crop_max_area, anchor.scale_margin
        self.anchor_seed = anchor.seed



class MultiViewCrop(RandomResizedCrop):
    """Several views' crops from one decode of each image, as torchvision's two transforms of one
    PIL image: (B, V, R, R, 3). View v's box is the one RandomResizedCrop(seed=seeds[v]) would
    draw, so the views are the same as with one decoder per view, at half the decoding for two
    views. TakeView(v) starts view v's pipeline."""

    def __init__(self, resolution: int, scales, ratios, seeds, partial_decode=True):
        super().__init__((resolution, resolution), scales[0], ratios[0], seeds[0], partial_decode)
        for scale, ratio in zip(scales, ratios):
            check_crop(scale, ratio)
        self.scales, self.ratios, self.seeds = list(scales), list(ratios), list(seeds)

    def declare_state_and_memory(self, previous_state):
        state, (_, temp) = super().declare_state_and_memory(previous_state)
        shape = (len(self.seeds), *self.output_size, 3)
        return replace(state, shape=shape), (AllocationQuery(shape, np.uint8), temp)

    def view_seeds(self) -> np.ndarray:
        return np.array(self.seeds, np.uint64)

    def box_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.scales, np.float64), np.log(np.array(self.ratios, np.float64))


@_njit(parallel=True)
def take_view(images, dst, index):
    n = images.shape[0]
    for i in numba.prange(n):
        dst[i] = images[i, index]
    return dst[:n]


@_njit(parallel=True)
def normalize_batch(images, dst, table):
    """dst[..., c] = table[images[..., c], c]: uint8 to float through a lookup table."""
    n = images.shape[0]
    for i in numba.prange(n):
        src, out = images[i].reshape(-1, 3), dst[i].reshape(-1, 3)
        for p in range(src.shape[0]):
            for c in range(3):
                out[p, c] = table[src[p, c], c]
    return dst[:n]


class Normalize(NormalizeImage):
    """ffcv's NormalizeImage ((x - mean) / std through its 256-entry table, the same numbers),
    whose CPU code is cached (ffcv's is compiled in every process)."""

    def generate_code_cpu(self):
        table = self.lookup_table

        def normalize(images, dst):
            return normalize_batch(images, dst, table)

        return _cached(normalize)


class TakeView(Operation):
    """View `index` of MultiViewCrop's (B, V, H, W, 3) output, copied into its own buffer."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def declare_state_and_memory(self, previous_state):
        shape = previous_state.shape[1:]
        return replace(previous_state, shape=shape, jit_mode=True), AllocationQuery(shape, np.uint8)

    def generate_code(self):
        index = self.index

        def take(images, dst):
            return take_view(images, dst, index)

        return _cached(take)


# ----------------------------------------------------------------------------------------------
# View recipes.
# ----------------------------------------------------------------------------------------------
@dataclass
class ViewConfig:
    """How one view is made from an image; the operations run in this order."""

    resolution: int = 32
    """Output side in pixels (the random crop is resized to resolution x resolution)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image (torchvision RandomResizedCrop)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio, sampled log-uniformly."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter (then all four adjustments, in random order)."""
    brightness: float = 0.4
    """Brightness strength: factor ~ U[max(0, 1 - x), 1 + x]; 0 disables it."""
    contrast: float = 0.4
    """Contrast strength, as brightness."""
    saturation: float = 0.2
    """Saturation strength, as brightness."""
    hue: float = 0.1
    """Hue strength: shift ~ U[-x, x] of the colour wheel, x <= 0.5."""
    grayscale_p: float = 0.2
    """Probability of turning the view to grayscale."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's sigma in pixels."""
    blur_kernel_size: int = 0
    """Blur kernel side (odd); 0 picks about 10% of the resolution, as SimCLR and BYOL do."""
    solarize_p: float = 0.0
    """Probability of solarization."""
    solarize_threshold: int = 128
    """Pixels at or above this grey level (0-255) are inverted."""
    noise_p: float = 0.0
    """Probability of additive Gaussian noise."""
    noise_std: float = 0.0
    """Noise standard deviation in [0, 1] image units."""

    def validate(self, prefix: str = "") -> None:
        """One line naming the first bad setting (flags as a method file's: `--view1.hue`)."""
        def pair_ok(v, low, high):
            return low < v[0] <= v[1] <= high
        rules = [
            ("resolution", self.resolution, 1 <= self.resolution <= 4096, "an integer in 1..4096"),
            ("crop-scale", self.crop_scale, pair_ok(self.crop_scale, 0, 1),
             "two fractions 0 < min <= max <= 1"),
            ("crop-ratio", self.crop_ratio, pair_ok(self.crop_ratio, 0, math.inf),
             "two ratios 0 < min <= max"),
            ("brightness", self.brightness, self.brightness >= 0, ">= 0"),
            ("contrast", self.contrast, self.contrast >= 0, ">= 0"),
            ("saturation", self.saturation, self.saturation >= 0, ">= 0"),
            ("hue", self.hue, 0 <= self.hue <= 0.5, "in [0, 0.5]"),
            ("blur-sigma", self.blur_sigma, pair_ok(self.blur_sigma, 0, math.inf),
             "two values 0 < min <= max (pixels)"),
            ("blur-kernel-size", self.blur_kernel_size,
             self.blur_kernel_size == 0 or (self.blur_kernel_size > 0 and self.blur_kernel_size % 2),
             "0 (automatic) or an odd integer >= 1"),
            ("solarize-threshold", self.solarize_threshold, 0 <= self.solarize_threshold <= 255,
             "a grey level in 0..255"),
            ("noise-std", self.noise_std, self.noise_std >= 0, ">= 0 (in [0, 1] image units)"),
        ] + [(name.replace("_", "-"), getattr(self, name), 0 <= getattr(self, name) <= 1,
              "a probability in [0, 1]")
             for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "noise_p")]
        for name, value, allowed, what in rules:
            numbers = value if isinstance(value, tuple) else (value,)
            if len(numbers) != (2 if isinstance(value, tuple) else 1) or not all(
                    math.isfinite(v) for v in numbers) or not allowed:
                raise ValueError(f"{prefix}{name} {value}: must be {what}")

    def kernel_size(self) -> int:
        if self.blur_kernel_size:
            return self.blur_kernel_size
        return max(3, int(0.1 * self.resolution) // 2 * 2 + 1)

    def augmentations(self, seed: int = 0) -> list[Operation]:
        """The operations after the crop, each with its own seed, leaving out those that never
        fire (less to compile)."""
        ops: list[Operation] = []
        if self.flip_p > 0:
            ops.append(RandomHorizontalFlip(self.flip_p, seed=seed + 1))
        if self.jitter_p > 0 and max(self.brightness, self.contrast, self.saturation, self.hue) > 0:
            ops.append(RandomColorJitter(self.brightness, self.contrast, self.saturation, self.hue,
                                         self.jitter_p, seed=seed + 2))
        if self.grayscale_p > 0:
            ops.append(RandomGrayscale(self.grayscale_p, seed=seed + 3))
        if self.blur_p > 0:
            ops.append(RandomGaussianBlur(self.kernel_size(), self.blur_sigma, self.blur_p,
                                          seed=seed + 4))
        if self.solarize_p > 0:
            ops.append(RandomSolarization(self.solarize_threshold, self.solarize_p, seed=seed + 5))
        if self.noise_p > 0 and self.noise_std > 0:
            ops.append(GaussianNoise(self.noise_std, self.noise_p, seed=seed + 6))
        return ops


def simclr_views(resolution: int = 32) -> tuple[ViewConfig, ViewConfig]:
    """SimCLR (Chen et al. 2020): two identically distributed views; colour strength 0.5 (jitter
    0.4/0.4/0.4/0.1, p=0.8), grayscale 0.2. Its ImageNet recipe adds blur p=0.5; its CIFAR recipe
    and this small-image default leave blur out."""
    v = ViewConfig(resolution=resolution, saturation=0.4)
    return v, replace(v)


def byol_views(resolution: int = 32) -> tuple[ViewConfig, ViewConfig]:
    """BYOL (Grill et al. 2020), also used by VICReg and Barlow Twins: jitter 0.4/0.4/0.2/0.1 p=0.8,
    grayscale 0.2, and asymmetric blur (1.0 / 0.1) and solarization (0 / 0.2)."""
    v = ViewConfig(resolution=resolution)
    return replace(v, blur_p=1.0), replace(v, blur_p=0.1, solarize_p=0.2)


def minimal_views(resolution: int = 32) -> tuple[ViewConfig, ViewConfig]:
    """The paper's finding (Bordes et al. 2023, Sec. 4): random crop + grayscale go a long way."""
    v = ViewConfig(resolution=resolution, flip_p=0.0, jitter_p=0.0, grayscale_p=0.2)
    return v, replace(v)


PRESETS = {"simclr": simclr_views, "byol": byol_views, "minimal": minimal_views}


# ----------------------------------------------------------------------------------------------
# Loaders.
# ----------------------------------------------------------------------------------------------
class _EpochIterator(EpochIterator):
    """ffcv's epoch thread, plus: hands back the outputs in the loader's order, and forwards an
    exception raised while loading (ffcv only forwards StopIteration: the training loop would
    wait forever)."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 - re-raised in the consumer's thread
            self.output_queue.put(err)

    def __next__(self):
        item = self.output_queue.get()
        if item is None or isinstance(item, Exception):
            self.close()
            if item is None:
                raise StopIteration
            raise RuntimeError(f"loading {self.loader.fname} failed: {item!r}") from item
        slot, batch = item
        if IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])  # the batch's copy is done
        return tuple(batch[i] for i in self.loader.output_positions)


# A program that ends with a loader mid-epoch (`next(iter(loader))`, an exception in the training
# loop) leaves ffcv's loading thread working on the next batches in numba's thread pool (TBB), and
# Python's exit then stops it abruptly: 3 of 18 processes whose first batch had compiled on an
# empty cache aborted at exit on the Xeon ("terminate called without an active exception", exit
# status 134 instead of the program's; tests/test_numba_cache.py). Every loader is closed first.
_LOADERS = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(_LOADERS)])


class SSLLoader(Loader):
    """An ffcv Loader whose batches are the named outputs, in the order given. ffcv orders them
    as the file's fields then the new names. Set `next_epoch` before iterating to resume."""

    def __init__(self, fname, outputs: Sequence[str], **kwargs):
        super().__init__(fname, **kwargs)
        _LOADERS.add(self)
        names = list(self.pipeline_specs)
        self.output_positions = [names.index(name) for name in outputs]
        if isinstance(self.traversal_order, QuasiRandom):  # its page table before any shuffle
            self._initial_pages = self.traversal_order.page_to_samples_array.copy()

    skip_batches = 0
    """Batches to leave out at the start of the next epoch (a run resumed mid-epoch): the rest
    are the batches an uninterrupted run would have seen, with the same random views."""

    _orders_drawn = 0  # epochs whose quasi-random order this loader has drawn

    _epoch = None  # the last epoch's iterator

    def __iter__(self):  # ffcv's, returning our iterator
        self.close()
        Compiler.set_num_threads(self.num_workers)
        if isinstance(self.traversal_order, QuasiRandom):
            # ffcv's quasi-random order shuffles its page table in place, so epoch k's order
            # depends on the k orders drawn before it: replay them (from the initial table if
            # need be), so that a run resumed at epoch k sees the uninterrupted run's order.
            if self._orders_drawn > self.next_epoch:
                self.traversal_order.page_to_samples_array = self._initial_pages.copy()
                self._orders_drawn = 0
            for epoch in range(self._orders_drawn, self.next_epoch):
                self.traversal_order.sample_order(epoch)
            self._orders_drawn = self.next_epoch + 1
        order = self.next_traversal_order()[: len(self) * self.batch_size]
        order = order[self.skip_batches * self.batch_size:]
        self.next_epoch, self.skip_batches = self.next_epoch + 1, 0
        if self.code is None or self.recompile:
            self.generate_code()
        self._epoch = _EpochIterator(self, order)
        return self._epoch

    def close(self) -> None:
        """Stops an unfinished epoch, after at most the batch in progress. ffcv's loading
        thread holds a reference to its iterator, so an epoch left unfinished
        (`next(iter(loader))`, a `break`) is never collected: its thread fills the queue, then
        waits forever, keeping the epoch's batch buffers (~0.5 GB for two 160 px views at batch
        64, measured). Called by every new epoch; call it when you drop a loader mid-epoch."""
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        # The thread sees terminate_event only when a put has waited 0.5 s on a full queue, and
        # until then it fills the queue: stopping it that way cost ~2 s (a benchmark's timed
        # epoch after a warm-up break lost a third of its rate). With no batches left to start,
        # it ends after the one it is making; the queue is emptied so that its puts, the last
        # (of None) without a timeout, go through.
        epoch.terminate_event.set()
        epoch.iter_ixes = iter(())
        while epoch.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    epoch.output_queue.get_nowait()
            epoch.join(timeout=0.02)
        epoch.close()


# When one of the functions ffcv compiles for a pipeline (e.g. its wrapper of the C++ imdecode,
# one per decoder) is garbage-collected, numba's finaliser raises a KeyError from its own table of
# compiled versions, and Python prints "Exception ignored in: <finalize object ...>" with a
# traceback: harmless, but a user reads it as a crash. Seen after probe.py's feature extraction
# (tests/test_probe.py reproduces it). So every function ffcv compiles stays alive until the
# interpreter exits, where numba skips that finaliser: a few compiled functions per loader.
_COMPILED_BY_FFCV = []
_ffcv_compile = Compiler.compile


def _compile_and_keep(code, signature=None):
    if getattr(code, "cacheable", False):  # ours (see _cached): as ffcv would, plus the disk cache
        # numba's cache key leaves out parallel=: the decoder's closure holds ffcv's loop
        # (prange exactly when parallel), so the two versions get different keys.
        parallel = getattr(code, "is_parallel", False) and Compiler.num_threads > 1
        compiled = _njit(code, signature, parallel)
    else:
        compiled = _ffcv_compile(code, signature)
    _COMPILED_BY_FFCV.append(compiled)
    return compiled


Compiler.compile = staticmethod(_compile_and_keep)


class InterleavedLoader:
    """Several .beton files as one training set (e.g. STL-10's train and unlabeled): one shuffled
    ffcv loader per file, and each epoch's batches drawn from them in a random order seeded by
    (seed, epoch), every file giving all its batches. A batch holds images of one file (an ffcv
    loader reads one file); over an epoch every image is seen once, as with one file."""

    def __init__(self, loaders: Sequence[SSLLoader], seed: int):
        self.loaders, self.seed = list(loaders), seed
        self.next_epoch, self.skip_batches = 0, 0
        self.batch_size = self.loaders[0].batch_size

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def sources(self, epoch: int) -> np.ndarray:
        """Which file each batch of `epoch` comes from."""
        sources = np.repeat(np.arange(len(self.loaders)), [len(l) for l in self.loaders])
        np.random.default_rng([self.seed, epoch]).shuffle(sources)
        return sources

    def __iter__(self):
        sources = self.sources(self.next_epoch)
        done = sources[:self.skip_batches]
        for k, loader in enumerate(self.loaders):
            loader.next_epoch, loader.skip_batches = self.next_epoch, int((done == k).sum())
        self.next_epoch, self.skip_batches = self.next_epoch + 1, 0
        iterators = [iter(loader) for loader in self.loaders]
        for k in sources[len(done):]:
            yield next(iterators[k])

    def close(self) -> None:
        """Stops an unfinished epoch (SSLLoader.close)."""
        for loader in self.loaders:
            loader.close()


class _NormalizeOnDevice(torch.nn.Module):
    """(x - mean) / std in float32 on the GPU; elementwise, so channels_last is kept."""

    def __init__(self, mean, std, device):
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def _to_output(device: torch.device, normalize: bool, on_gpu: bool,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[Operation]:
    """The end of an image pipeline. On the GPU: copy uint8 (4x fewer bytes) without blocking,
    then channels_last and normalisation there. On the CPU: normalise with a numba op, which
    must come before ToTensor (a numba op after it makes ffcv's Loader() loop forever).
    A torch module is wrapped by hand: ffcv wraps bare modules only in pipelines that start from a
    field, not in ours, which start from a shared decoder (an H200 run found it)."""
    if on_gpu:
        ops = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
        if normalize:
            ops.append(ModuleWrapper(_NormalizeOnDevice(mean, std, device)))
        return ops
    ops = [Normalize(mean, std, np.float32)] if normalize else []
    return ops + [ToTensor(), ToTorchImage(channels_last=True)]


def _label_pipeline(device: torch.device, on_gpu: bool) -> list[Operation]:
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + [ToDevice(device, non_blocking=True)] if on_gpu else ops


def open_beton(path: str) -> Reader:
    """Checks that `path` is a readable .beton with an RGB `image` and an int `label` field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .beton file; write it with "
                                f"`python write_beton.py` (see README)")
    try:
        reader = Reader(path)
    except Exception as err:  # ffcv raises whatever numpy raises on a truncated header
        raise ValueError(f"{path} is not a valid .beton file ({type(err).__name__}: {err}); "
                         f"rewrite it with write_beton.py --overwrite") from err
    fields = {name: type(field) for name, field in reader.handlers.items()}
    if fields.get("image") is not RGBImageField or fields.get("label") is not IntField:
        raise ValueError(f"{path} has fields {sorted(fields)}; expected an RGB 'image' and an int "
                         f"'label' field as write_beton.py writes")
    if reader.num_samples == 0:
        raise ValueError(f"{path} holds no images; rewrite it with write_beton.py")
    return reader


def subset_indices(beton: str | Sequence[str], size: int, seed: int = 0):
    """`size` image indices drawn at random with `seed`, sorted, for a loader's `indices` (None
    when size is 0: all images). For several files, drawn from all of them together: a list with
    one array (or None) per file."""
    if isinstance(beton, str):
        picked = subset_indices([beton], size, seed)
        return None if picked is None else picked[0]
    if not size:
        return None
    counts = [int(open_beton(b).num_samples) for b in beton]  # uint64: permutation() gives floats
    if size > sum(counts):
        raise ValueError(f"a subset of {size} images asked from {', '.join(beton)}, which "
                         f"hold{'s' if len(beton) == 1 else ''} {sum(counts)}")
    picked = np.sort(np.random.default_rng(seed).permutation(sum(counts))[:size]).astype(np.int64)
    starts = np.cumsum([0] + counts)
    return [picked[(picked >= a) & (picked < b)] - a for a, b in zip(starts[:-1], starts[1:])]


def check_labels(beton: str, num_classes: int, unlabelled_ok: bool) -> None:
    """Labels must be 0 .. num_classes - 1 (or -1, unlabelled, where `unlabelled_ok`): a label out
    of range would crash the probe's cross-entropy, with a device assert on a GPU."""
    reader = open_beton(beton)
    labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
    low, high = int(labels.min()), int(labels.max())
    if high >= num_classes:
        raise ValueError(f"{beton} has labels up to {high}; pass --num-classes {high + 1}")
    if low < (-1 if unlabelled_ok else 0):
        what = "-1 (unlabelled) or more" if unlabelled_ok else "labelled (>= 0)"
        raise ValueError(f"{beton} has label {low}; its images must be {what}")


def _check_batches(path, reader, batch_size, drop_last, distributed, indices):
    world = torch.distributed.get_world_size() if distributed else 1
    count = reader.num_samples if indices is None else len(indices)
    if drop_last and count // world < batch_size:
        raise ValueError(f"{path} has {count} images to train on, fewer than one batch of "
                         f"{batch_size} per process; lower --batch-size")


def _chain(ops: list[Operation]) -> list[Operation]:
    return [AugmentChain(ops)] if ops else []


def make_ssl_loader(beton: str | Sequence[str], views: Sequence[ViewConfig], batch_size: int,
                    num_workers: int = 2, seed: int = 0, distributed: bool = False,
                    device: str | torch.device = "cpu", shared_crop: bool = False,
                    normalize: bool = True, indices=None, drop_last: bool = True,
                    negatives: Sequence[ViewConfig] = (), order: str = "random",
                    os_cache: bool = True, partial_decode: bool = True,
                    decode_once: bool = True) -> "SSLLoader | InterleavedLoader":
    """A shuffled loader yielding `(view_1, ..., view_k, label)`, or with `negatives`
    `(view_1, ..., view_k, negative_1, ..., negative_m, label)`.

    `beton` may be several files (then `indices` is a list with one entry per file, as
    subset_indices gives): an InterleavedLoader over one loader per file, each with its own seeds.

    Each view decodes and crops the image on its own; with `shared_crop`, views[0]'s crop is made
    once and every view branches after it (its own flips, colours, noise...: the two positives of
    instance SimCLR). Each of `negatives` (needs `shared_crop`) is another patch of the same image,
    the size of the shared crop and not overlapping it where the image allows, with its own
    augmentations (its crop settings are unused). Views are float32 (B, 3, R, R) channels_last,
    normalised, on `device`.

    `order`: "random" (every epoch a fresh permutation) or "quasi_random" (ffcv's QUASI_RANDOM:
    random within a window of the file's pages, so each epoch reads the file in large chunks;
    for data sets larger than RAM, with `os_cache=False`; not under DDP in ffcv 1.0.2).
    `os_cache`: True reads through the OS page cache (shared by processes; the file should fit in
    RAM), False makes each process read and cache pages itself.
    `partial_decode`: JPEGs are decoded only where the crop is, at a reduced scale when the crop
    is much larger than the view (jpeg_decode_plan); False decodes every pixel.
    `decode_once`: views of one resolution are cut from one decode of each image (MultiViewCrop:
    the same views, half the decoding for two); False decodes the image once per view.

    Like every ffcv loader, batches live in buffers that are reused a few batches later: use each
    batch at once, and clone what you keep.
    """
    if not views:
        raise ValueError("at least one view is needed")
    if order not in ("random", "quasi_random"):
        raise ValueError(f"order {order!r}: use 'random' or 'quasi_random'")
    if order == "quasi_random" and distributed:
        raise ValueError("order 'quasi_random' is not available under DDP (ffcv 1.0.2 has no "
                         "distributed quasi-random order): use order 'random'")
    if not isinstance(beton, str):
        per_file = indices if indices is not None else [None] * len(beton)
        loaders = [make_ssl_loader(b, views, batch_size, num_workers, seed + 65537 * k,
                                   distributed, device, shared_crop, normalize, per_file[k],
                                   drop_last, negatives, order, os_cache, partial_decode,
                                   decode_once)
                   for k, b in enumerate(beton)]
        return loaders[0] if len(loaders) == 1 else InterleavedLoader(loaders, seed)
    reader = open_beton(beton)
    _check_batches(beton, reader, batch_size, drop_last, distributed, indices)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if negatives and not shared_crop:
        raise ValueError("negative patches are placed away from the shared crop: pass "
                         "shared_crop=True")
    names = [f"view_{k + 1}" for k in range(len(views))]
    pipelines: dict = {"image": None, "label": _label_pipeline(device, on_gpu)}
    shared = None
    if shared_crop:
        if len({v.resolution for v in [*views, *negatives]}) > 1:
            raise ValueError("views branching after a shared crop, and negative patches, must "
                             "have one resolution")
        v0 = views[0]
        shared = RandomResizedCrop((v0.resolution, v0.resolution), v0.crop_scale, v0.crop_ratio,
                                   seed=seed * 1000, partial_decode=partial_decode)
    view_seeds = [seed * 1000 + 10 * (k + 1) for k in range(len(views))]  # each op: its stream
    together = None
    if shared is None and decode_once and len(views) > 1 and len(
            {v.resolution for v in views}) == 1:
        together = MultiViewCrop(views[0].resolution, [v.crop_scale for v in views],
                                 [v.crop_ratio for v in views], view_seeds, partial_decode)
        pipelines["views"] = PipelineSpec("image", decoder=together, transforms=[])
    for k, (name, view) in enumerate(zip(names, views)):
        view_seed = view_seeds[k]
        tail = _chain(view.augmentations(view_seed)) + _to_output(device, normalize, on_gpu)
        if shared is not None:
            # Branch after the shared crop (ffcv: a spec whose source is an operation).
            pipelines[name] = PipelineSpec(shared, transforms=tail)
        elif together is not None:
            pipelines[name] = PipelineSpec(together, transforms=[TakeView(k)] + tail)
        else:
            crop = RandomResizedCrop((view.resolution, view.resolution), view.crop_scale,
                                     view.crop_ratio, seed=view_seed,
                                     partial_decode=partial_decode)
            pipelines[name] = PipelineSpec("image", decoder=crop, transforms=tail)
    negative_names = [f"negative_{m + 1}" for m in range(len(negatives))]
    for m, (name, view) in enumerate(zip(negative_names, negatives)):
        view_seed = seed * 1000 + 10 * (len(views) + m + 1)
        tail = _chain(view.augmentations(view_seed)) + _to_output(device, normalize, on_gpu)
        pipelines[name] = PipelineSpec("image", decoder=NegativePatchCrop(shared, view_seed),
                                       transforms=tail)
    if shared is not None:
        pipelines["crop"] = PipelineSpec("image", decoder=shared, transforms=[])
    return SSLLoader(beton, outputs=names + negative_names + ["label"], batch_size=batch_size,
                     num_workers=num_workers, seed=seed, distributed=distributed,
                     order=OrderOption.QUASI_RANDOM if order == "quasi_random" else
                     OrderOption.RANDOM, pipelines=pipelines, drop_last=drop_last,
                     indices=indices, os_cache=os_cache)


def make_eval_loader(beton: str, resolution: int, batch_size: int, num_workers: int = 2,
                     distributed: bool = False, device: str | torch.device = "cpu",
                     crop_ratio: float = 1.0, normalize: bool = True,
                     indices: Sequence[int] | None = None, os_cache: bool = True,
                     partial_decode: bool = True) -> SSLLoader:
    """A loader in file order yielding `(image, label)`: centre crop of `crop_ratio` of the short
    side (224/256 for ImageNet-style evaluation, 1.0 for small images), resized, no augmentation,
    every image once (no drop_last). Clone what you keep (see make_ssl_loader)."""
    open_beton(beton)  # a clear error now rather than a failure inside ffcv
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    pipelines = {
        "image": [CenterCrop((resolution, resolution), crop_ratio, partial_decode)]
        + _to_output(device, normalize, on_gpu),
        "label": _label_pipeline(device, on_gpu),
    }
    return SSLLoader(beton, outputs=["image", "label"], batch_size=batch_size,
                     num_workers=num_workers, order=OrderOption.SEQUENTIAL, seed=0,
                     distributed=distributed, pipelines=pipelines, drop_last=False,
                     indices=indices, os_cache=os_cache)


# ----------------------------------------------------------------------------------------------
# Preview: python ffcv_ssl_common.py --beton data/fashion-mnist_train.beton --out views.png
# ----------------------------------------------------------------------------------------------
@dataclass
class PreviewArgs:
    beton: str
    """The .beton file to draw images from."""
    out: str = "views.png"
    """Where to write the picture (one row per image: the original, then its views)."""
    preset: Literal["simclr", "byol", "minimal"] = "simclr"
    """Augmentation recipe; views alternate between the recipe's two view configurations."""
    resolution: int = 64
    """Side of each view in pixels."""
    num_images: int = 8
    """Rows: how many images."""
    num_views: int = 6
    """Columns after the original: augmented views per image."""
    seed: int = 0
    """Loader seed (same seed, same picture)."""


def preview(args: PreviewArgs) -> str:
    import torchvision

    pair = PRESETS[args.preset](args.resolution)
    views = [pair[k % 2] for k in range(args.num_views)]
    n = min(args.num_images, open_beton(args.beton).num_samples)
    loader = make_ssl_loader(args.beton, views, batch_size=n, seed=args.seed, normalize=False)
    *augmented, _ = next(iter(loader))
    order = loader.first_traversal_order[:n]
    plain = make_eval_loader(args.beton, args.resolution, batch_size=n, normalize=False,
                             indices=order)
    originals, _ = next(iter(plain))
    grid = torch.stack([originals] + augmented, dim=1)  # (n, 1 + views, 3, R, R)
    grid = grid.flatten(0, 1).float() / 255
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp.png"
    torchvision.utils.save_image(grid, tmp, nrow=1 + args.num_views, padding=2, pad_value=1.0)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {n} images x (original + {args.num_views} '{args.preset}' views)")
    return args.out


if __name__ == "__main__":
    import tyro

    preview(tyro.cli(PreviewArgs))
