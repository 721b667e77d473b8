"""The FFCV multi-view pipeline, the SSL augmentations, and the run infrastructure that no method
changes: the only module the method files (and probe.py) share. Five parts, top to bottom:

Part 1. Compiled code: numba's flags and its on-disk cache (safe for processes that compile at
    once), ffcv's C++ JPEG decoder declared for our kernels.
Part 2. Augmentations. ffcv 1.0.2 decodes, crops and flips; it lacks hue, grayscale, blur,
    solarization and noise, and its random operations are not reproducible. Here, as
    numba-compiled ffcv Operations, each drawing from its own counter-based random stream:
        RandomHorizontalFlip  mirror left-right
        RandomColorJitter     brightness, contrast, saturation, hue; torchvision's factors and
                              random order
        RandomGrayscale       ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
        RandomSolarization    x -> 255 - x where x >= threshold
        RandomGaussianBlur    separable Gaussian, sigma ~ U(sigma range), reflect padding
        GaussianNoise         additive N(0, std) per pixel (std in [0, 1] image units)
        AugmentChain          several of the above in one pass per image (how a view's run)
    ViewConfig holds one view's recipe (the method files' --view1.* flags); simclr_views,
    byol_views and minimal_views are the papers'. How to add an augmentation: Part 2's first
    comment.
Part 3. Data. RandomResizedCrop (ffcv's crop decoder with reproducible boxes, resampled as
    torchvision does: bilinear with antialiasing, not OpenCV's INTER_AREA; JPEGs decoded only
    where the crops are), CenterCrop (evaluation), MultiViewCrop (several views from one decode),
    NegativePatchCrop (instance SimCLR); make_ssl_loader and make_eval_loader yield
    `(view_1, ..., view_k, label)` or `(image, label)`:

        loader = make_ssl_loader("data/fashion-mnist_train.beton", simclr_views(32), 256)
        for x1, x2, y in loader: ...

Part 4. Run infrastructure, as passive helpers that the training loops call:
        settings     DataConfig, NumericsConfig, RunConfig (groups of flags), check_settings
        backbones    make_backbone (torchvision's ResNets at any --width, three stems), stem_spec
        LARS         the optimiser of SimCLR and Barlow Twins
        processes    start_processes -> Env (device, DDP rank, precision), parallel, finish
        checkpoints  open_run, load_checkpoint, resume, save_checkpoint: exact resume
        Clock        training time, time budget, checkpoint interval, pre-emption signals
        Logbook      console line, log.jsonl, TensorBoard, wandb, curves.png
        monitors     probe_loss_of, evaluate (online linear probe, k-NN, RankMe)
        export       export_backbone: backbone.pt and backbone.json, which probe.py rebuilds
Part 5. Preview what a recipe does:
        python ffcv_ssl_common.py --beton data/fashion-mnist_train.beton

Reproducibility: every random number is a hash of (the operation's seed, derived from the loader's
seed; the image indices of the batch; the image's slot; a counter), so the same seed gives the same
batches whatever the number of worker threads, and a shuffled loader gives new views every epoch.
"""

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
import weakref
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import llvmlite.binding
import numba
import numba.typed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
import tyro._strings
from tqdm import tqdm
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

# ==============================================================================================
# Part 1. Compiled code: numba's flags and its on-disk cache, ffcv's C++ decoder.
# ==============================================================================================

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

# ==============================================================================================
# Part 2. Augmentations: counter-based random numbers, the per-image kernels, the ffcv
# Operations that apply them, and the view recipes (ViewConfig). How to add one: below.
# ==============================================================================================
# How to add an augmentation (say, a random inversion):
# 1. A kernel that changes one (H, W, 3) uint8 image in place, at module level and decorated
#    @_njit (numba caches it on disk only then): `def invert_(img): ...`. Its random numbers come
#    from `uniform(key, counter)` or `normal_pair(key, counter)` with counters from 1 on: counter
#    0 of the image's stream `key` decides whether the operation fires (augment_batch).
# 2. A kind: add INVERT to the `FLIP, JITTER, ... = range(...)` line, and its branch to _apply(),
#    which reads its settings from consts[1:] (consts[0] is its probability).
# 3. An Operation: `class RandomInvert(_BatchOp)` with `kind = INVERT` and a `seed_offset` that no
#    other operation has, below SEEDS_PER_VIEW: the loaders give view k the seeds
#    base + SEEDS_PER_VIEW * (k + 1) + offset, offset 0 being its crop, so an offset of
#    SEEDS_PER_VIEW would draw the next view's crop's numbers. _BatchOp refuses a taken or too
#    large offset when the class is defined (tests/test_loader.py checks every stream of a loader
#    is distinct).
# 4. ViewConfig: the settings (say `invert_p`, with a docstring each: they become --view1.invert-p
#    and its help), a rule in ViewConfig.validate(), a line in ViewConfig.augmentations().
# tests/test_augmentations.py compares each kernel with torchvision's functional on real photos:
# add the new one there.

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
SEEDS_PER_VIEW = 10  # a view's random streams: its crop (offset 0), then its operations' offsets


class _BatchOp(Operation):
    """Base of our augmentations: uint8 (B, H, W, 3) in, a new uint8 (B, H, W, 3) buffer out.
    `seed_offset`: the operation's stream within a view (ViewConfig.augmentations), unique."""

    kind = -1
    seed_offset = 0
    _offsets: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "seed_offset" not in cls.__dict__:
            return  # AugmentChain, or a subclass of an operation: no stream of its own
        taken = _BatchOp._offsets.setdefault(cls.seed_offset, cls.__name__)
        if not 0 < cls.seed_offset < SEEDS_PER_VIEW or taken != cls.__name__:
            raise TypeError(f"{cls.__name__}.seed_offset {cls.seed_offset}: must be in 1.."
                            f"{SEEDS_PER_VIEW - 1} and not another operation's ({taken}'s)")

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

    kind, seed_offset = FLIP, 1

    def __init__(self, p=0.5, seed=0):
        super().__init__(p, seed=seed)


class RandomColorJitter(_BatchOp):
    """torchvision's `RandomApply([ColorJitter(b, c, s, h)], p)`: with probability p, the four
    adjustments in a random order, factors ~ U[max(0, 1 - x), 1 + x] (hue: U[-h, h]); a zero
    strength leaves that adjustment out, as torchvision does."""

    kind, seed_offset = JITTER, 2

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, seed=0):
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            raise ValueError(f"jitter strengths must be >= 0 (hue in [0, 0.5]), got "
                             f"{brightness}, {contrast}, {saturation}, {hue}")
        super().__init__(p, brightness, contrast, saturation, hue, seed=seed)


class RandomGrayscale(_BatchOp):
    """torchvision's `RandomGrayscale(p)`: the luma copied to all three channels."""

    kind, seed_offset = GRAYSCALE, 3

    def __init__(self, p=0.2, seed=0):
        super().__init__(p, seed=seed)


class RandomSolarization(_BatchOp):
    """torchvision's `RandomSolarize(threshold, p)` on uint8: pixels >= threshold become 255 - x."""

    kind, seed_offset = SOLARIZE, 5

    def __init__(self, threshold=128, p=0.2, seed=0):
        if not 0 <= threshold <= 255:
            raise ValueError(f"solarization threshold must be a grey level 0-255, got {threshold}")
        super().__init__(p, threshold, seed=seed)


class RandomGaussianBlur(_BatchOp):
    """torchvision's `RandomApply([GaussianBlur(kernel_size, sigma)], p)`: sigma ~ U(sigma range)
    per image, reflect padding, rounded back to uint8."""

    kind, seed_offset = BLUR, 4

    def __init__(self, kernel_size, sigma=(0.1, 2.0), p=0.5, seed=0):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 < min <= max, got {sigma}")
        super().__init__(p, kernel_size, sigma[0], sigma[1], seed=seed)


class GaussianNoise(_BatchOp):
    """Adds N(0, std^2) to every pixel and channel, std in [0, 1] image units (std=0.1 is about 25
    grey levels), then rounds and clips to uint8."""

    kind, seed_offset = NOISE, 6

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
        """The operations after the crop, each on its own random stream (seed + its seed_offset),
        leaving out those that never fire (less to compile)."""
        ops: list[_BatchOp] = []
        if self.flip_p > 0:
            ops.append(RandomHorizontalFlip(self.flip_p))
        if self.jitter_p > 0 and max(self.brightness, self.contrast, self.saturation, self.hue) > 0:
            ops.append(RandomColorJitter(self.brightness, self.contrast, self.saturation, self.hue,
                                         self.jitter_p))
        if self.grayscale_p > 0:
            ops.append(RandomGrayscale(self.grayscale_p))
        if self.blur_p > 0:
            ops.append(RandomGaussianBlur(self.kernel_size(), self.blur_sigma, self.blur_p))
        if self.solarize_p > 0:
            ops.append(RandomSolarization(self.solarize_threshold, self.solarize_p))
        if self.noise_p > 0 and self.noise_std > 0:
            ops.append(GaussianNoise(self.noise_std, self.noise_p))
        for op in ops:
            op.seed = seed + op.seed_offset
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


# ==============================================================================================
# Part 3. Data: crops resampled as torchvision does, JPEGs decoded only where the crops
# are, the crop decoders, and the loaders.
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# Resampling: a crop resized as torchvision's RandomResizedCrop / Resize (antialiased).
# ----------------------------------------------------------------------------------------------
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


def check_crop(scale, ratio) -> None:
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop scale must be in (0, 1] and ordered, ratio positive and "
                         f"ordered; got scale={scale}, ratio={ratio}")


class RandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """ffcv's RandomResizedCropRGBImageDecoder (decode, crop and resize in one pass), with the
    crop boxes drawn from our counter-based generator so that they can be reproduced, and the
    crop resampled as torchvision's RandomResizedCrop does by default (resize_crop_antialias:
    bilinear with antialiasing). The official SimCLR, Barlow Twins and VICReg code resizes crops
    bicubically (PIL's BICUBIC); bilinear here, as torchvision's default and FFCV's. JPEGs are
    decoded by libjpeg-turbo with TJFLAG_FASTDCT (ffcv's C++ imdecode): about one grey level
    from PIL's decode of the same file (tests/test_loader.py)."""

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
    draw, at half the decoding for two views. With partial_decode=False the views are those of
    one decoder per view, bit for bit. With partial decoding (the default) a JPEG's decode scale
    and region follow all the boxes at once, so a view can be resampled from another scale than
    its own decoder would have used: 0.02-0.23 grey levels apart on average, 1.2 for the worst
    image (32-64 px views of 180-512 px photos, tests/test_loader.py). TakeView(v) starts view
    v's pipeline."""

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

    labelled = True
    """Whether the last batch came from a file with labels (make_ssl_loader sets it): a batch
    of an unlabelled file leaves the online probe's optimiser alone (no step, no decay)."""

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
        self.labelled = True  # the last batch's file's (SSLLoader.labelled)

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
            self.labelled = self.loaders[k].labelled  # the same file in every DDP process
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


def fingerprint(beton: str) -> dict:
    """What identifies a .beton's contents, cheaply (a few ms): its size, image count and a
    hash of its header, its metadata table (every image's size, position and label) and 64 KiB
    at 16 evenly spaced places of its data. Checkpoints keep it: a file rewritten under the same
    name with other images does not resume an old run."""
    reader, size = open_beton(beton), os.path.getsize(beton)
    digest = hashlib.sha256(np.ascontiguousarray(reader.metadata).tobytes())
    with open(beton, "rb") as f:
        for k in range(17):
            f.seek(min(size - 1, k * size // 16))
            digest.update(f.read(65536))
    return {"path": os.path.abspath(beton), "bytes": size, "images": int(reader.num_samples),
            "sha256": digest.hexdigest()[:32]}


def folder_problem(path: str) -> str | None:
    """Why files cannot be written in folder `path` (made if missing), or None: an existing
    part of the path that is not a folder, or a folder that is not writable."""
    path = os.path.abspath(path)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def has_labels(beton: str) -> bool:
    """Whether any image of the file is labelled (STL-10's unlabeled split: none, label -1)."""
    reader = open_beton(beton)
    return bool((reader.metadata[f"f{list(reader.handlers).index('label')}"] >= 0).any())


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


def loader_threads(num_workers: int) -> int:
    """`num_workers`, or for 0 this process's share of the cores it may run on: the cores of its
    CPU affinity divided by torchrun's processes on this node (LOCAL_WORLD_SIZE), at least 1."""
    if num_workers > 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


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
    half the decoding for two; the same views bit for bit with partial_decode=False, within a
    fraction of a grey level with it); False decodes the image once per view.

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
    # View k's streams: its crop, then each operation at its seed_offset (SEEDS_PER_VIEW).
    view_seeds = [seed * 1000 + SEEDS_PER_VIEW * (k + 1) for k in range(len(views))]
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
        view_seed = seed * 1000 + SEEDS_PER_VIEW * (len(views) + m + 1)
        tail = _chain(view.augmentations(view_seed)) + _to_output(device, normalize, on_gpu)
        pipelines[name] = PipelineSpec("image", decoder=NegativePatchCrop(shared, view_seed),
                                       transforms=tail)
    if shared is not None:
        pipelines["crop"] = PipelineSpec("image", decoder=shared, transforms=[])
    loader = SSLLoader(beton, outputs=names + negative_names + ["label"], batch_size=batch_size,
                       num_workers=loader_threads(num_workers), seed=seed,
                       distributed=distributed,
                       order=OrderOption.QUASI_RANDOM if order == "quasi_random" else
                       OrderOption.RANDOM, pipelines=pipelines, drop_last=drop_last,
                       indices=indices, os_cache=os_cache)
    loader.labelled = has_labels(beton)
    return loader


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
                     num_workers=loader_threads(num_workers), order=OrderOption.SEQUENTIAL, seed=0,
                     distributed=distributed, pipelines=pipelines, drop_last=False,
                     indices=indices, os_cache=os_cache)



# ==============================================================================================
# Part 4. Run infrastructure: what no method changes. Passive helpers that the method files'
# training loops call: they own no control flow, call nothing back, never import a method file,
# and read only the run settings (the rest of Args is saved and compared as a whole).
# ==============================================================================================

# ---- Settings every method file shares, and how settings are checked -------------------------
NO_PREFIX = tyro.conf.OmitArgPrefixes
"""Marks a group of a method's settings (`Annotated[Group, NO_PREFIX]`): `--help` lists them
under the group's name, and their flags keep their plain names (`--out-dir`, not
`--run.out-dir`)."""


def check_settings(rules, prefix: str = "") -> None:
    """rules: (flag, value, allowed?, what is allowed). The first one broken raises ValueError in
    one line naming the flag (nan and inf are refused too: they pass some comparisons)."""
    for flag, value, allowed, what in rules:
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers) or not allowed:
            raise ValueError(f"{prefix}{flag} {value}: must be {what}")


def epoch_resolution(schedule: tuple[int, int, int] | None, resolution: int, epoch: int) -> int:
    """The views' side in `epoch`: `resolution` without a schedule; else START, growing linearly
    to END at epoch RAMP_EPOCHS, rounded down to a multiple of 8 (ffcv-imagenet: 32) but not
    below START."""
    if schedule is None:
        return resolution
    start, end, ramp = schedule
    if epoch >= ramp:
        return end
    return max(start, (start + (end - start) * epoch // ramp) // 8 * 8)


@dataclass
class DataConfig:
    """Which images: the training and validation files, a subset, the order, the resolution
    schedule."""

    train_beton: tuple[str, ...] = ("data/fashion-mnist_train.beton",)
    """Training images: one .beton or several (e.g. STL-10's train and unlabeled files). Labels
    are only used by the online probe; label -1 marks an unlabelled image."""
    val_beton: str = "data/fashion-mnist_val.beton"
    """Validation images (labelled), for the online probe."""
    num_classes: int = 10
    """Classes of the online linear probe (labels 0 .. num_classes - 1)."""
    train_subset: int = 0
    """Train on this many images drawn at random with --seed (0: all); for quick runs."""
    order: Literal["random", "quasi_random"] = "random"
    """Training order: a fresh permutation every epoch, or ffcv's quasi-random order (random
    within a window of the file's pages: large reads, for data sets larger than RAM, with
    --no-os-cache; not under torchrun in ffcv 1.0.2)."""
    resolution_schedule: tuple[int, int, int] | None = None
    """Progressive resolution (ffcv-imagenet, FFCV-SSL): START END RAMP_EPOCHS: the views are
    START px in epoch 0, grow linearly to END px at epoch RAMP_EPOCHS (multiples of 8 in between)
    and stay there; END replaces the views' resolution (evaluation, stem and export use it).
    Early epochs cost less; a resumed run takes up its epoch's resolution again."""
    eval_crop_ratio: float = 1.0
    """Evaluation (online monitors, and probe.py's default through backbone.json): the centre
    square of this fraction of the short side, resized to the views' size. 1.0, the whole image,
    suits small images (CIFAR, Fashion-MNIST); ImageNet practice is 0.875 (224 of 256)."""

    def validate(self) -> None:
        schedule = self.resolution_schedule
        check_settings([
            ("--train-beton", self.train_beton, len(self.train_beton) >= 1,
             "one or more .beton files"),
            ("--eval-crop-ratio", self.eval_crop_ratio, 0 < self.eval_crop_ratio <= 1,
             "a fraction in (0, 1] (0.875 for ImageNet)"),
            ("--num-classes", self.num_classes, self.num_classes >= 1, "an integer >= 1"),
            ("--train-subset", self.train_subset, self.train_subset >= 0, ">= 0 (0: all images)"),
            ("--resolution-schedule", schedule, schedule is None or (
                8 <= schedule[0] <= schedule[1] <= 4096 and schedule[2] >= 1),
             "START END RAMP_EPOCHS with 8 <= START <= END <= 4096 and RAMP_EPOCHS >= 1")])


@dataclass
class NumericsConfig:
    """The seed and the arithmetic: they change the numbers, so a run resumes only with the same
    values."""

    seed: int = 0
    """Seed of the weights' initialisation, the data order and every augmentation."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """bf16 or fp16 autocast, or plain fp32. auto: bf16 where the hardware computes in bf16 (CUDA
    GPUs from Ampere on; CPUs with AVX512-BF16 or AMX, about 2x faster than fp32); fp16 on older
    CUDA GPUs with tensor cores (V100, T4: compute capability 7.x), with a gradient scaler whose
    state is saved in checkpoints; fp32 elsewhere: other CPUs emulate bf16, 12x slower than fp32
    for a ResNet-18 step on an AVX2-only EPYC."""
    tf32: bool = True
    """On CUDA GPUs from Ampere on, fp32 matmuls and convolutions (all of an fp32 run, the loss of
    a mixed one) in TF32, several times faster; --no-tf32 for full fp32."""
    sync_bn: bool = True
    """SyncBatchNorm under DDP on GPUs: BatchNorm statistics over the global batch, as in the
    official code. torch has no CPU SyncBatchNorm: CPU processes normalise over their own share."""

    def validate(self) -> None:
        check_settings([("--seed", self.seed, 0 <= self.seed < 2**32, "an integer in [0, 2^32)")])


@dataclass
class RunConfig:
    """Where the run writes, how it is carried out and reported: a run may resume with other
    values of these."""

    out_dir: str = "runs/run"
    """Checkpoints, logs, exported backbone."""
    resume: bool = True
    """Continue from out_dir/checkpoint.pt if it exists; refused when a setting that changes the
    result differs. --no-resume starts over: the checkpoint, log and exports in out_dir are
    deleted."""
    checkpoint_every_min: float = 10.0
    """Minutes between checkpoints within an epoch (0: only at the end of each epoch). SIGTERM and
    SIGUSR1 (sent by clusters before pre-emption) also save one, then stop the run."""
    max_steps: int = 0
    """Stop after this many steps in all (0: no limit), with a checkpoint; for smoke tests."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available."""
    num_workers: int = 0
    """Loader threads per process; 0: this process's share of the machine's cores (all of them
    for one process, divided among torchrun's processes on a node). The random views do not
    depend on it; a GPU needs many (2 fed an H200 280 images/s, 16 fed it 1,160)."""
    os_cache: bool = True
    """Read the .beton files through the OS page cache (they should fit in RAM); --no-os-cache:
    each process reads and caches what it needs itself."""
    compile: bool = False
    """torch.compile the model."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline logs to disk
    without an account or a network). The run's id is stable per --out-dir: resumes continue it."""

    def validate(self) -> None:
        out = self.out_dir
        problem = bool(out.strip()) and folder_problem(out)
        check_settings([
            ("--out-dir", out, bool(out.strip()) and (os.path.isdir(out) or not os.path.exists(
                out)), "a folder"),
            ("--out-dir", out, not problem, f"a folder this run can write ({problem})"),
            ("--checkpoint-every-min", self.checkpoint_every_min, self.checkpoint_every_min >= 0,
             ">= 0 (0: at the end of each epoch only)"),
            ("--max-steps", self.max_steps, self.max_steps >= 0, ">= 0 (0: no limit)"),
            ("--num-workers", self.num_workers, self.num_workers >= 0,
             ">= 0 (0: this process's share of the cores)")])
        for wanted, package in ((self.tensorboard, "tensorboard"), (self.wandb, "wandb")):
            if wanted and importlib.util.find_spec(package) is None:
                raise ValueError(f"--{package} needs the {package} package: pip install {package}")


RUN_ONLY = frozenset(f.name for f in dataclasses.fields(RunConfig))  # may change on resume


def settings(args) -> dict:
    """A method's Args as one dict, each group's settings at the top level, named as their flags
    (`{"train_beton": ..., "view1": {...}, "out_dir": ...}`): printed, saved in args.json and in
    checkpoints, compared on resume."""
    hints = typing.get_type_hints(type(args), include_extras=True)
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if NO_PREFIX in getattr(hints[f.name], "__metadata__", ()):
            out.update(value)
        else:
            out[f.name] = value
    return out


def with_settings(args, **changes):
    """A copy of a method's Args with settings changed by their flags' names, whichever group
    holds them: `with_settings(simclr.Args(), batch_size=64, temperature=0.2)`."""
    hints = typing.get_type_hints(type(args), include_extras=True)
    top = {f.name for f in dataclasses.fields(args)}
    for name, value in changes.items():
        groups = [f.name for f in dataclasses.fields(args)
                  if NO_PREFIX in getattr(hints[f.name], "__metadata__", ())
                  and name in {g.name for g in dataclasses.fields(getattr(args, f.name))}]
        if groups:
            group = getattr(args, groups[0])
            args = replace(args, **{groups[0]: replace(group, **{name: value})})
        elif name in top:
            args = replace(args, **{name: value})
        else:
            raise TypeError(f"{type(args).__module__}.Args has no setting {name!r}")
    return args


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """{"view1.resolution": 32, ...}, tuples as lists: saved and current settings compare."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.loads(json.dumps(value))
    return out


# tyro 1.0.17 joins a docstring's lines before it removes their indentation, so it took every
# continuation line of a field's docstring (indented in the source) for a new paragraph: --help
# broke each one mid-sentence. Here the indentation goes first; then the lines of a paragraph
# are joined, except indented ones (the commands in a file's docstring), which stay lines.
def _join_lines(text: str) -> str:
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", tyro._strings.dedent(text).strip()):
        lines = []
        for line in paragraph.rstrip().splitlines():
            if lines and not line[:1].isspace() and not lines[-1][:1].isspace():
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


tyro._strings.remove_single_line_breaks = _join_lines


# ---- Backbones: torchvision's ResNets, any width, three stems ------------------------------
RESNETS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n.startswith(("resnet", "resnext", "wide_resnet"))]
STEMS = {  # the first convolution (and whether the max-pool follows), as backbone.json has it
    "small": {"conv1": {"kernel_size": 3, "stride": 1, "padding": 1}, "maxpool": False},
    "small-stride2": {"conv1": {"kernel_size": 3, "stride": 2, "padding": 1}, "maxpool": False},
    "imagenet": {"conv1": {"kernel_size": 7, "stride": 2, "padding": 3}, "maxpool": True},
}


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet `arch` (its blocks, depths and groups) with `width` channels in its
    first stage instead of 64, doubled at each stage as there: width 32 has a quarter of the
    parameters and multiply-adds of torchvision's (the CPU demo's encoder, ~4x faster steps)."""

    def __init__(self, arch: str, width: int, zero_init_residual: bool):
        ref = torchvision.models.get_model(arch, weights=None)
        self.width = width
        super().__init__(type(ref.layer1[0]), [len(ref.layer1), len(ref.layer2),
                                               len(ref.layer3), len(ref.layer4)],
                         zero_init_residual=zero_init_residual, groups=ref.groups,
                         width_per_group=ref.base_width)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)  # torchvision's, `width` wide
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(self.inplanes, 1000)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage takes the stem's `width` channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def make_backbone(arch: str, stem: str | dict, zero_init_residual: bool = True,
                  width: int = 64) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (fc = Identity; ScaledResNet unless width is
    torchvision's 64) and its feature width. `stem`: a name of STEMS, or backbone.json's
    description of one (probe.py rebuilds an export from it)."""
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(RESNETS)}")
    spec = STEMS[stem] if isinstance(stem, str) else stem
    if width == 64:
        net = torchvision.models.get_model(arch, weights=None,
                                           zero_init_residual=zero_init_residual)
    else:
        net = ScaledResNet(arch, width, zero_init_residual)
    features = net.fc.in_features
    net.fc = nn.Identity()
    if spec["conv1"] != STEMS["imagenet"]["conv1"]:  # torchvision's conv1 (and its init) kept
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, bias=False, **spec["conv1"])
    if not spec["maxpool"]:
        net.maxpool = nn.Identity()
    return net, features


def resolve_stem(stem: str, resolution: int) -> str:
    """--stem auto: the small stem for views of 64 px or less, the ImageNet stem above."""
    return ("small" if resolution <= 64 else "imagenet") if stem == "auto" else stem


def stem_spec(net: nn.Module) -> dict:
    """How the backbone's stem was built, for backbone.json: probe.py rebuilds it from this."""
    c = net.conv1
    return {"conv1": {"kernel_size": c.kernel_size[0], "stride": c.stride[0],
                      "padding": c.padding[0]}, "maxpool": isinstance(net.maxpool, nn.MaxPool2d)}


def backbone_rules(arch: str, width: int) -> list:
    """check_settings rules of the backbone flags every method file has."""
    return [("--arch", arch, arch in RESNETS, "one of " + ", ".join(RESNETS)),
            ("--width", width, width >= 16 and width % 16 == 0,
             "a multiple of 16 (torchvision's ResNets: 64)")]


# ---- LARS --------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR and Barlow Twins: for each weight tensor, the update
    g + wd * w is rescaled by eta * ||w|| / ||g + wd * w||, then SGD momentum. Parameter groups
    with `lars_exclude` (biases, BatchNorm) get neither weight decay nor the rescaling."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


# ---- Processes, devices and precision ---------------------------------------------------------
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (see NumericsConfig.precision)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:  # Linux, as ffcv
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype --precision means on `device` (None: fp32, no autocast)."""
    if precision == "auto":
        if bf16_is_fast(device):
            return torch.bfloat16
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0):
            return torch.float16  # tensor cores without bf16: V100, T4
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass
class Env:
    """This process's place in the run (start_processes' answer)."""

    device: torch.device
    rank: int
    world: int
    local_batch: int  # this process's share of the global batch
    amp_dtype: torch.dtype | None  # autocast's dtype; None: fp32
    sync_bn: bool  # SyncBatchNorm (DDP on GPUs with --sync-bn)
    resolved: dict = dataclasses.field(default_factory=dict)  # open_run: what the run resolved

    @property
    def distributed(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:  # rank 0 writes the files and prints
        return self.rank == 0


def start_processes(run: RunConfig, numerics: NumericsConfig, batch_size: int) -> Env:
    """Under torchrun (RANK and WORLD_SIZE set): one process per GPU with NCCL, or CPU processes
    with gloo; otherwise one process. Seeds torch and resolves --precision, TF32, SyncBN."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        use_cuda = torch.cuda.is_available() and run.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda
                              else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
        device, rank, world = torch.device("cuda" if use_cuda else "cpu"), 0, 1
    local_batch = batch_size // world
    if batch_size % world or local_batch < 2:
        raise ValueError(f"--batch-size {batch_size} must split into {world} equal shares of at "
                         f"least 2 images")
    torch.manual_seed(numerics.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = numerics.tf32
        # The views' size is fixed: cuDNN times its convolution algorithms once and keeps the
        # fastest (as benchmarks/bench_epoch.py, whose speed-ups the README reports). The choice
        # may differ between runs: GPU runs are not bit-reproducible anyway.
        torch.backends.cudnn.benchmark = True
    distributed = world > 1 or dist.is_initialized()
    return Env(device, rank, world, local_batch, autocast_dtype(numerics.precision, device),
               distributed and numerics.sync_bn and device.type == "cuda")


def check_data(data: DataConfig, env: Env) -> None:
    """The data settings against the files and the processes, before anything slow."""
    if data.order == "quasi_random" and env.distributed:
        raise ValueError("--order quasi_random is not available under torchrun (ffcv 1.0.2 has no "
                         "distributed quasi-random order); use --order random")
    if data.train_subset and data.train_subset // env.world < env.local_batch:
        raise ValueError(f"--train-subset {data.train_subset} is smaller than one batch "
                         f"({env.local_batch} images per process); raise it or lower --batch-size")
    for path in data.train_beton:
        check_labels(path, data.num_classes, unlabelled_ok=True)
    check_labels(data.val_beton, data.num_classes, unlabelled_ok=False)


def parallel(model: nn.Module, env: Env, compile: bool) -> nn.Module:
    """What the training step calls: DDP under torchrun (gradients averaged over the processes),
    torch.compile'd with --compile. The checkpoints keep `model` itself."""
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(net) if compile else net


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over DDP processes (the logged numbers are the whole batch's, not rank 0's)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def check_replicas(model: nn.Module, env: Env) -> int:
    """Under DDP every process must hold the same weights: a desync is an error, not noise.
    Returns how many processes agreed."""
    if not env.distributed:
        return 1
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP processes hold different weights: {digests}")
    return len(digests)


def finish(env: Env, clock: "Clock", step: int) -> None:
    """The end of a run's processes. After a signal: says how to resume, and exits with status
    128 + the signal's number (every process, whichever caught it)."""
    if clock.signal and env.main:
        print(f"caught signal {clock.signal} at step {step}: checkpoint saved in "
              f"{clock.checkpoint}; run the same command to resume", flush=True)
    if env.distributed:
        dist.destroy_process_group()
    release_out_dirs()  # the out_dir is free for the next run
    if clock.signal:
        raise SystemExit(128 + clock.signal)


# ---- Checkpoints and exact resume ---------------------------------------------------------
CHECKPOINT_KEYS = {"model", "optimizer", "probe_optimizer", "epoch", "batch", "step", "sums",
                   "rng", "args", "log_bytes", "method", "elapsed", "scaler"}


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file,
    and a failed write (a full disk) keeps the previous file and says so in one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise OSError(f"cannot write {path} ({reason}); the previous version, if any, is "
                      f"kept: free some space or fix the folder, and run again") from None


def load_checkpoint(path: str, args, method: str, resolved: dict | None = None) -> dict:
    """The checkpoint, if it is one of `method`'s and from a run with the same settings (all but
    RunConfig's) and, where `resolved` is given, the same world size, precision and data as
    this run (checkpoints before 2026-12-02 did not record them); else one line saying why and
    what to do. map_location="cpu": the RNG state must stay a CPU tensor, and load_state_dict
    moves everything else to the model's device."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or a pickle that is not plain tensors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} cannot be loaded as a checkpoint ({reason}); delete it, or "
                         f"pass --no-resume to start over") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt) or (
            ckpt["method"] != method):
        raise ValueError(f"{path} is not a checkpoint of {method}.py; delete it, use another "
                         f"--out-dir, or pass --no-resume to start over")
    saved, now = flat_settings(ckpt["args"]), flat_settings(settings(args))
    changed = [k for k in now if k.split(".")[0] not in RUN_ONLY and saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {now[k]} (checkpoint: {saved.get(k)})"
                          for k in changed)
        raise ValueError(f"{path} is from a run with other settings: {diffs}; resume with the "
                         f"checkpoint's settings, use another --out-dir, or pass --no-resume "
                         f"to discard it")
    then = ckpt.get("resolved")
    if resolved and then:
        check_same_run(path, then, resolved)
    return ckpt


def check_same_run(path: str, then: dict, now: dict) -> None:
    """A resume is exact only on the same number of processes (each takes its share of every
    batch: another world size would see some images twice and others never), in the same
    precision (--precision auto resolves per device) and on the same images."""
    fix = "or pass --no-resume to start over"
    if then["world"] != now["world"]:
        raise ValueError(f"{path} was saved by a run of {then['world']} process(es), this one "
                         f"has {now['world']}: an exact resume needs the same number (torchrun "
                         f"--nproc-per-node {then['world']}), {fix}")
    if then["precision"] != now["precision"]:
        raise ValueError(f"{path} was trained in {then['precision']}, this run computes in "
                         f"{now['precision']} (on {now['device']}): pass --precision "
                         f"{then['precision']}, {fix}")
    for old, new in zip(then["data"], now["data"]):
        if old != new:
            same_size = (old["images"], old["bytes"]) == (new["images"], new["bytes"])
            what = "the same size, other contents" if same_size else (
                f"{old['images']} images in {old['bytes']} bytes then, {new['images']} in "
                f"{new['bytes']} now")
            raise ValueError(f"{new['path']} is not the file the checkpoint trained on ({what}): "
                             f"restore it, use another --out-dir, {fix}")


def save_provenance(args, method: str, resolved: dict) -> None:
    """args.json (the settings, what they resolved to, the command, the git commit, versions) and
    a copy of the code that ran, in out_dir/code/."""
    here, out_dir = os.path.dirname(os.path.abspath(__file__)), args.run.out_dir
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--",
                                     "*.py"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    info = {**settings(args), "resolved": resolved, "command": sys.argv,
            "git_commit": commit, "git_uncommitted_changes": dirty,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    with open(os.path.join(out_dir, "args.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(out_dir, "args.json.tmp"), os.path.join(out_dir, "args.json"))
    os.makedirs(os.path.join(out_dir, "code"), exist_ok=True)
    for name in (f"{method}.py", os.path.basename(__file__)):
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, "code", name))


_RUN_LOCKS: dict = {}  # out_dir -> the open lock file of the run this process has there


def lock_out_dir(out_dir: str) -> None:
    """One run per out_dir at a time: a second run into it (which would resume the first's
    checkpoint while it trains, and log every line twice) is refused, naming the process that
    holds it. The lock (flock on out_dir/.lock) goes with the process, however it ends."""
    key = os.path.realpath(out_dir)
    with contextlib.suppress(KeyError):
        _RUN_LOCKS.pop(key).close()  # a run of this process that is over
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out_dir} is in use by another run (process {holder}); wait for it "
                         f"to end, or give this run another --out-dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _RUN_LOCKS[key] = f


def release_out_dirs() -> None:
    """Gives up this process's out_dir locks (a process that ends gives them up anyway)."""
    for f in _RUN_LOCKS.values():
        f.close()
    _RUN_LOCKS.clear()


def open_run(args, method: str, env: Env, resolved: dict) -> dict | None:
    """Before anything slow: takes the out_dir (lock_out_dir), and finds the checkpoint to resume
    from (None: a new run, whose out_dir loses the previous run's checkpoint, log and exports),
    refused in one line if it is damaged, from other settings, another world size or precision,
    or other data. Then the main process prints the command and the settings and saves them."""
    path = os.path.join(args.run.out_dir, "checkpoint.pt")
    if env.main:
        os.makedirs(args.run.out_dir, exist_ok=True)
        lock_out_dir(args.run.out_dir)
    env.resolved = {"device": str(env.device), "world": env.world,
                    "precision": PRECISION_NAMES[env.amp_dtype], **resolved,
                    "sync_bn": env.sync_bn,
                    "data": [fingerprint(b) for b in (*args.data.train_beton,
                                                       args.data.val_beton)]}
    resolved = env.resolved
    resuming = args.run.resume and os.path.exists(path)
    try:
        ckpt = load_checkpoint(path, args, method, resolved) if resuming else None
    except ValueError:  # refused: the folder is free again (for a run in this same process too)
        release_out_dirs()
        raise
    if env.main:
        for name in () if resuming else ("checkpoint.pt", "log.jsonl", "backbone.pt",
                                         "backbone.json", "curves.png"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.run.out_dir, name))
        print("python " + " ".join(sys.argv))
        print(json.dumps({**settings(args), "resolved": resolved}, indent=1))
        save_provenance(args, method, resolved)
        if env.distributed and args.numerics.sync_bn and not env.sync_bn:
            print("note: SyncBatchNorm needs GPUs (torch has no CPU kernel for it): each CPU "
                  "process normalises over its own share of the batch")
        if ckpt is not None:
            print(f"resumed from {path} at epoch {ckpt['epoch']}, batch {ckpt['batch']} "
                  f"(step {ckpt['step']})")
    return ckpt


def resume(ckpt: dict | None, states: dict) -> tuple[int, int, int]:
    """Loads every state dict of `states` (name: module or optimiser) and the torch RNG from the
    checkpoint; returns where training goes on: (epoch, batch of that epoch, step); (0, 0, 0)
    for a new run."""
    if ckpt is None:
        return 0, 0, 0
    for name, obj in states.items():
        if ckpt[name]:  # a bf16 / fp32 run's (disabled) gradient scaler saves an empty state
            obj.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng"].cpu())  # a CPU tensor whatever map_location said
    return ckpt["epoch"], ckpt["batch"], ckpt["step"]


def save_checkpoint(args, method: str, env: Env, states: dict, at: tuple[int, int, int],
                    clock: "Clock", log: "Logbook") -> None:
    """checkpoint.pt (main process): every state dict, where the run is (at: epoch, batches of it
    done, step), the torch RNG, the clock's training time, the log's length and the epoch's loss
    sums: what an uninterrupted run would have in memory at this point."""
    if env.main:
        epoch, batch, step = at
        check_finite(states["model"], step, clock.checkpoint)
        save_atomic({**{name: obj.state_dict() for name, obj in states.items()},
                     "epoch": epoch, "batch": batch, "step": step, "sums": log.sums,
                     "rng": torch.get_rng_state(), "args": settings(args), "method": method,
                     "elapsed": clock.elapsed, "log_bytes": log.size(),
                     "resolved": env.resolved}, clock.checkpoint)
    clock.saved()


def check_finite(model: nn.Module, step: int, checkpoint: str) -> None:
    """Non-finite weights are never saved or exported (the loss is only checked every 20 steps,
    and a diverged model must not become the "last good checkpoint"). One sync: a reduction."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        bad = next(n for n, t in model.state_dict().items()
                   if t.is_floating_point() and not torch.isfinite(t).all())
        raise FloatingPointError(f"the weights are not finite at step {step} (first: {bad}), so "
                                 f"they were not saved; the last good checkpoint, if any, is kept "
                                 f"in {checkpoint}: lower --base-lr and resume or start over")


# ---- The clock: training time, the time budget, checkpoint intervals, signals ----------------
def catch_preemption() -> dict:
    """SIGTERM and SIGUSR1 (what SLURM and other schedulers send before they kill a job) only
    set a flag: the training loop saves a checkpoint after the current step and stops."""
    caught = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda s, frame: caught.setdefault("signal", s))
    return caught


AGREE_EVERY = 20  # steps between the DDP processes' agreements (Clock), each a CPU-GPU sync


class Clock:
    """Answers the training loop's questions after each step, the same in every process: is the
    time budget spent, is a checkpoint due (--checkpoint-every-min), must the run stop (a
    pre-emption signal caught by any process, or --max-steps reached), and how far along the
    schedule is it? It counts training time only: from each epoch's first batch (the loader's
    start-up is left out) to its last step, without evaluation and checkpoints.

    Under DDP the processes agree (the longest time, any signal) every AGREE_EVERY steps, not
    every step: an all-reduce read back on the CPU waits for the GPU's queue to drain. In
    between, the training time is extrapolated from the last two agreements, the same numbers
    in every process, so every process takes the same learning rate and stops at the same step.
    """

    def __init__(self, budget_min: float, run: RunConfig, env: Env, ckpt: dict | None):
        self.budget_s, self.every_s = 60 * budget_min, 60 * run.checkpoint_every_min
        self.max_steps, self.device = run.max_steps, env.device
        self.checkpoint = os.path.join(run.out_dir, "checkpoint.pt")
        self.elapsed = ckpt["elapsed"] if ckpt else 0.0  # seconds of training so far
        self.local = self.elapsed  # this process's own count (DDP: agreed every AGREE_EVERY)
        self.agreed, self.rate = None, 0.0  # (step, elapsed) last agreed; seconds per step
        self.caught = catch_preemption()
        self.saved_at, self.tick = time.time(), None
        self.signal, self.stop = 0, False
        self.spent = bool(self.budget_s) and self.elapsed >= self.budget_s

    def progress(self, step_fraction: float) -> float:
        """The fraction of the schedule done: of the steps (`step_fraction`, of --epochs) or,
        with a time budget, of whichever limit is nearer, so that the schedule ends when the
        run does, whether the budget or the epochs run out first."""
        if not self.budget_s:
            return step_fraction
        return max(self.elapsed / self.budget_s, step_fraction)

    def start_step(self) -> None:
        if self.tick is None:  # the first step since the epoch began or a checkpoint
            self.tick = time.time()

    def end_step(self, step: int) -> bool:
        """Adds the step's time; whether a checkpoint is due now (stop, or the interval)."""
        now = time.time()
        self.local += now - self.tick
        self.tick = now
        if not dist.is_initialized():
            self.signal, self.elapsed = self.caught.get("signal", 0), self.local
        elif step % AGREE_EVERY == 0:
            self.signal, self.local = self._agree()
            if self.agreed is not None and step > self.agreed[0]:
                self.rate = (self.local - self.agreed[1]) / (step - self.agreed[0])
            self.agreed, self.elapsed = (step, self.local), self.local
        else:
            if self.agreed is None:  # a resumed or new run: from where it starts
                self.agreed = (step - 1, self.elapsed)
            self.elapsed = self.agreed[1] + (step - self.agreed[0]) * self.rate
        self.spent = bool(self.budget_s) and self.elapsed >= self.budget_s
        self.stop = bool(self.max_steps and step >= self.max_steps) or bool(self.signal)
        due = 0 < self.every_s <= time.time() - self.saved_at
        return (self.stop or due) and not self.spent

    def saved(self) -> None:
        self.saved_at, self.tick = time.time(), None  # saving is not training time

    def _agree(self) -> tuple[int, float]:
        """The signal any process caught (0: none) and the longest training time."""
        values = torch.tensor([float(self.caught.get("signal", 0)), self.local],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)  # a sync point, every AGREE_EVERY steps
        return int(values[0].item()), values[1].item()


# ---- The logbook: console, log.jsonl, TensorBoard, wandb, curves ----------------------------
class Logbook:
    """What a run reports, from the main process: a progress bar; every 20 steps a loss record in
    log.jsonl (and a check that the loss is finite); after each epoch one console line and one
    log.jsonl record with every metric, also sent to TensorBoard and wandb; curves.png at the
    end. It also keeps the epoch's loss sums (checkpointed: a resumed epoch's mean is exact)."""

    def __init__(self, args, method: str, env: Env, ckpt: dict | None, epochs: int):
        out_dir = args.run.out_dir
        self.path, self.method, self.env, self.epochs = (os.path.join(out_dir, "log.jsonl"),
                                                          method, env, epochs)
        self.checkpoint = os.path.join(out_dir, "checkpoint.pt")
        sums = ckpt["sums"] if ckpt else None
        self.sums = None if sums is None else sums.to(env.device)  # loaded onto the CPU
        self.writer = self.wandb = None
        if not env.main:
            return
        if ckpt and self.size() > ckpt["log_bytes"]:
            with open(self.path, "a") as f:  # forget what was logged after the checkpoint
                f.truncate(ckpt["log_bytes"])  # (never longer: that would append zero bytes)
        if args.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(out_dir)
        if args.run.wandb:
            import wandb

            run_id = hashlib.sha256(os.path.abspath(out_dir).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project="jessl", name=f"{method} {out_dir}", id=run_id,
                                    dir=out_dir, config=settings(args), resume="allow")

    def epoch(self, loader, epoch: int, batch: int, steps_per_epoch: int):
        """The epoch's batches (from `batch` on) behind a progress bar."""
        self.start, self.first_batch = time.time(), batch
        if batch == 0:
            self.sums = None
        # Quiet when stderr is not a terminal (a log file would get every redraw); the epoch's
        # console line and log.jsonl say the same.
        self.bar = tqdm(loader, desc=f"epoch {epoch}", total=steps_per_epoch, initial=batch,
                        disable=not (self.env.main and sys.stderr.isatty()), leave=False)
        return self.bar

    def step(self, step: int, loss: torch.Tensor, terms: dict, lr: float) -> None:
        values = torch.stack([loss.detach(), *[t.detach() for t in terms.values()]]).float()
        self.sums = values if self.sums is None else self.sums + values
        self.terms = list(terms)
        if step % 20 == 0:
            value = global_mean(loss.detach()).item()  # a CPU-GPU sync point: every 20 steps
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss is {value} at step {step}; lower --base-lr (the last good checkpoint, "
                    f"if any, is kept in {self.checkpoint})")
            self.bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
            self.write({"step": step, "loss": value, "lr": lr})

    def end_epoch(self, epoch: int, batch: int) -> dict:
        """The epoch's mean loss and terms over every process, and its speed."""
        means = (global_mean(self.sums) / batch).tolist()  # loss, then each term
        if not math.isfinite(means[0]):
            raise FloatingPointError(f"loss is {means[0]} in epoch {epoch}; lower --base-lr "
                                     f"(the last good checkpoint is kept in {self.checkpoint})")
        seen = (batch - self.first_batch) * self.env.local_batch * self.env.world
        return {"loss": means[0], **dict(zip(self.terms, means[1:])),
                "images_per_s": seen / (time.time() - self.start)}

    def record(self, result: dict) -> dict:
        """One epoch's metrics: the console line, log.jsonl, TensorBoard, wandb."""
        if self.env.main:
            r = result
            print(f"epoch {r['epoch']:g}/{self.epochs} | loss {r['loss']:.4f} | lr {r['lr']:.4g} "
                  f"| {r['images_per_s']:.0f} img/s | online probe {100 * r['probe_acc']:.2f}% | "
                  f"k-NN {100 * r['knn_acc']:.2f}% | RankMe {r['rankme']:.1f} | "
                  f"{r['train_min']:.1f} min", flush=True)
            self.write(result)
            if self.writer:
                for key, value in result.items():
                    self.writer.add_scalar(key, value, result["step"])
            if self.wandb:
                self.wandb.log(result, step=result["step"])
        return result

    def write(self, record: dict) -> None:
        if self.env.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def size(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def close(self) -> None:
        """curves.png from log.jsonl; TensorBoard and wandb closed."""
        if not self.env.main:
            return
        if os.path.exists(self.path):
            plot_curves(self.path, os.path.join(os.path.dirname(self.path), "curves.png"),
                        self.method)
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def plot_curves(log_path: str, png_path: str, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in open(log_path, errors="replace"):
        with contextlib.suppress(ValueError):  # a line cut by a crash, or edited by hand
            rows.append(json.loads(line))
    rows = [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]
    steps = [r for r in rows if "probe_acc" not in r]
    epochs = [r for r in rows if "probe_acc" in r]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o", label="epoch")
    axes[0].set(xlabel="step", ylabel=f"{method} loss")
    x = [r["epoch"] for r in epochs]
    axes[1].plot(x, [100 * r["probe_acc"] for r in epochs], marker="o", label="linear probe")
    axes[1].plot(x, [100 * r["knn_acc"] for r in epochs], marker="s", label="k-NN (k=20)")
    axes[1].set(xlabel="epoch", ylabel="online val top-1 (%)")
    axes[1].legend()
    axes[2].plot(x, [r["rankme"] for r in epochs], marker="o")
    axes[2].set(xlabel="epoch", ylabel="RankMe of the features")
    axes[3].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    axes[3].set(xlabel="step", ylabel="learning rate")
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    os.replace(png_path + ".tmp.png", png_path)
    plt.close(fig)


# ---- Online monitors: the probe, k-NN and RankMe on the validation set ------------------------
MONITOR_IMAGES = 10_000  # validation images for the k-NN and RankMe monitors


def probe_loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The online probe's loss: cross-entropy over the labelled images of the batch (label -1:
    unlabelled, skipped); 0 when there are none. No data-dependent branch: no CPU-GPU sync."""
    total = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
    return total / (y >= 0).sum().clamp(min=1)


def monitor_images(count: int) -> np.ndarray:
    """The validation images the k-NN and RankMe monitors use: all of them up to MONITOR_IMAGES,
    else MONITOR_IMAGES drawn at random with a fixed seed (an image-folder .beton is written
    class by class: its first 10,000 images would be a few classes), sorted; the same whatever
    the number of processes."""
    if count <= MONITOR_IMAGES:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, MONITOR_IMAGES, replace=False))


def make_monitor_loader(beton: str, resolution: int, env: Env, run: RunConfig,
                        crop_ratio: float = 1.0) -> SSLLoader:
    """The validation loader of the online monitors: every image once, centre-cropped; under
    DDP each process takes every world-th image (ffcv's distributed order pads its shares with
    repeats, which the probe would count twice and the leave-one-out k-NN would find at cosine
    1)."""
    share = np.arange(int(open_beton(beton).num_samples))[env.rank::env.world]
    return make_eval_loader(beton, resolution, 512, run.num_workers, False, env.device,
                            crop_ratio, indices=share, os_cache=run.os_cache)


@torch.no_grad()
def evaluate(model: nn.Module, loader: SSLLoader, env: Env) -> dict:
    """The epoch's monitors on the validation set (make_monitor_loader), from `model.backbone`
    and `model.probe`: the online linear probe's top-1 over every image, and on the features of
    monitor_images() (gathered from every process, in image order): k-NN top-1 and RankMe."""
    model.eval()
    device, amp_dtype = env.device, env.amp_dtype
    share = np.asarray(loader.indices)  # this process's images, in the loader's order
    count = int(open_beton(loader.fname).num_samples)
    wanted = torch.from_numpy(np.isin(share, monitor_images(count)))
    correct = torch.zeros(2, device=device)  # (correct, seen)
    feats, labels, seen = [], [], 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            h = model.backbone(x)
            logits = model.probe(h)
        correct += torch.stack([(logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
        keep = wanted[seen:seen + len(y)].to(device)
        feats.append(h.float()[keep])
        labels.append(y[keep].clone())  # ffcv reuses its buffers
        seen += len(y)
    order = torch.from_numpy(share[wanted.numpy()])
    feats, labels = torch.cat(feats), torch.cat(labels)
    if dist.is_initialized():
        dist.all_reduce(correct)
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (order, feats.cpu(), labels.cpu()))
        order = torch.cat([o for o, _, _ in shares])
        feats = torch.cat([f for _, f, _ in shares]).to(device)
        labels = torch.cat([y for _, _, y in shares]).to(device)
    by_image = torch.argsort(order).to(device)  # the same order at every world size
    feats, labels = feats[by_image], labels[by_image]
    model.train()
    return {"probe_acc": (correct[0] / correct[1]).item(),
            "knn_acc": knn_leave_one_out(feats, labels), "rankme": rankme(feats)}


def knn_leave_one_out(feats: torch.Tensor, labels: torch.Tensor, k: int = 20,
                      temperature: float = 0.07) -> float:
    """Top-1 of weighted k-NN (Wu et al. 2018, as solo-learn and lightly monitor): each image is
    classified by the votes exp(cosine / T) of its k nearest other images of the set."""
    feats = F.normalize(feats, dim=1)
    k = min(k, len(feats) - 1)
    classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, len(feats), 1024):
        sim = feats[start:start + 1024] @ feats.T  # (chunk, N)
        rows = torch.arange(len(sim), device=feats.device)
        sim[rows, rows + start] = -float("inf")  # not its own neighbour
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=feats.device)
        votes.scatter_add_(1, labels[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == labels[start:start + 1024]).sum().item()
    return correct / len(feats)


def rankme(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023, eq. 1): exp of the entropy of the
    normalised singular values of the (N, d) feature matrix, an effective rank between 1 and
    min(N, d) that needs no labels: it tracks downstream accuracy and falls on collapse."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


# ---- Export -------------------------------------------------------------------------------
def export_backbone(backbone: nn.Module, out_dir: str, arch: str, width: int, resolution: int,
                    crop_ratio: float, method: str, env: Env) -> None:
    """backbone.pt: the backbone alone, which torchvision's model (ScaledResNet for a width other
    than 64) with fc = Identity() and the stem that backbone.json describes takes with
    load_state_dict(strict=True); probe.py rebuilds it from backbone.json."""
    if not env.main:
        return
    check_finite(backbone, -1, os.path.join(out_dir, "checkpoint.pt"))
    save_atomic(backbone.state_dict(), os.path.join(out_dir, "backbone.pt"))
    path = os.path.join(out_dir, "backbone.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"arch": arch, "width": width, "stem": stem_spec(backbone),
                   "resolution": resolution, "crop_ratio": crop_ratio, "method": method}, f)
    os.replace(path + ".tmp", path)


# ==============================================================================================
# Part 5. Preview: python ffcv_ssl_common.py --beton data/fashion-mnist_train.beton --out views.png
# ==============================================================================================
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
