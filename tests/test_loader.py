"""The loaders on a small .beton that write_beton.py wrote from test-made idx files: shapes,
dtypes, labels, value ranges, reproducibility, shared crops, and the error paths. Loaders compile
for seconds each, so each one is built once per module."""

import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import ffcv_ssl_common as C
from conftest import COUNT_COMPILES, label_images

MEAN = torch.tensor(C.IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
STD = torch.tensor(C.IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


def first(loader):
    return next(iter(loader))


def collect(loader):
    """Every batch, concatenated. ffcv reuses its buffers a few batches later: clone each."""
    return [torch.cat(parts) for parts in zip(*[[t.clone() for t in b] for b in loader])]


@pytest.fixture(scope="module")
def train(betons):
    return C.make_ssl_loader(betons["train"], C.byol_views(32), batch_size=64, num_workers=2,
                             seed=0)


@pytest.fixture(scope="module")
def eval_raw(betons):
    return C.make_eval_loader(betons["val"], 28, batch_size=32, normalize=False)


def test_train_batches_shapes_dtypes_ranges(train):
    assert len(train) == 320 // 64
    labels = []
    for x1, x2, y in train:
        for x in (x1, x2):
            assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert x.isfinite().all()
            assert (x >= (0 - MEAN) / STD - 1e-4).all() and (x <= (255 - MEAN) / STD + 1e-4).all()
        assert y.shape == (64,) and y.dtype == torch.int64
        assert not torch.equal(x1, x2)  # two views of one image differ
        labels.append(y.clone())
    labels = torch.cat(labels)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 32))  # each once


def test_epochs_differ_and_same_seed_same_batches(train, betons):
    start = train.next_epoch
    a = first(train)
    b = first(train)  # next epoch: new order, new views
    assert not torch.equal(a[2], b[2]) and not torch.equal(a[0], b[0])
    # A new loader, same seed, one worker thread instead of two, set to the same epoch (as a
    # resumed run does): the same batches.
    again = C.make_ssl_loader(betons["train"], C.byol_views(32), batch_size=64, num_workers=1,
                              seed=0)
    again.next_epoch = start
    c, d = first(again), first(again)
    for x, y in zip(a + b, c + d):
        assert torch.equal(x, y)


def test_eval_loader_returns_the_written_pixels_in_order(eval_raw, idx_dir):
    """Round trip: idx -> write_beton -> beton -> loader gives back every pixel, gray as RGB."""
    images, labels = label_images(100, seed=1)
    x, y = collect(eval_raw)
    assert x.shape == (100, 3, 28, 28) and x.dtype == torch.uint8  # no drop_last
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    expected = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.equal(x, expected)


def test_subset_indices_select_those_images(betons):
    indices = C.subset_indices(betons["val"], 30, seed=5)
    assert indices.dtype == np.int64 and len(set(indices.tolist())) == 30
    assert np.array_equal(indices, np.sort(indices)) and indices.max() < 100
    assert np.array_equal(indices, C.subset_indices(betons["val"], 30, seed=5))
    loader = C.make_eval_loader(betons["val"], 28, batch_size=16, normalize=False,
                                indices=indices)
    x, y = collect(loader)
    images, labels = label_images(100, seed=1)
    assert torch.equal(y, torch.from_numpy(labels[indices].astype(np.int64)))
    assert torch.equal(x[:, 0], torch.from_numpy(images[indices]))
    with pytest.raises(ValueError, match="holds 100"):
        C.subset_indices(betons["val"], 101)


def test_normalisation_cpu_and_gpu_style_pipelines_agree(betons, eval_raw):
    raw = collect(eval_raw)[0].float()
    cpu = C.make_eval_loader(betons["val"], 28, batch_size=32)
    got = collect(cpu)[0]
    torch.testing.assert_close(got, (raw - MEAN) / STD, rtol=0, atol=1e-5)
    # The CUDA tail (ToDevice non_blocking, channels_last, normalise on the device), run on the
    # CPU so this machine can check it.
    device = torch.device("cpu")
    pipelines = {"image": [C.CenterCrop((28, 28), 1.0)]
                 + C._to_output(device, normalize=True, on_gpu=True),
                 "label": C._label_pipeline(device, on_gpu=True)}
    gpu_style = C.SSLLoader(betons["val"], outputs=["image", "label"], batch_size=32,
                            num_workers=1, pipelines=pipelines, drop_last=False)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in gpu_style)
    torch.testing.assert_close(collect(gpu_style)[0], got, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["two views", "instance patches"])
def test_training_views_through_the_cuda_tail_equal_the_cpu_ones(betons, monkeypatch, kind):
    """make_ssl_loader with the CUDA tail (run on the CPU here): its pipelines start from a shared
    decoder, where ffcv does not wrap torch modules itself (the first GPU run of the method files
    failed there). The views must be the CPU path's, channels_last."""
    def views():
        if kind == "two views":
            return C.make_ssl_loader(betons["train"], C.byol_views(32), batch_size=64,
                                     num_workers=1, seed=0)
        patch = C.ViewConfig(resolution=16, crop_scale=(0.05, 0.1))
        return C.make_ssl_loader(betons["train"], [patch, patch], batch_size=64, num_workers=1,
                                 seed=0, shared_crop=True, negatives=[patch])

    cpu = collect(views())
    to_output, label_pipeline = C._to_output, C._label_pipeline
    monkeypatch.setattr(C, "_to_output", lambda device, normalize, on_gpu, **kw:
                        to_output(device, normalize, True, **kw))
    monkeypatch.setattr(C, "_label_pipeline", lambda device, on_gpu: label_pipeline(device, True))
    gpu_style = collect(views())
    assert len(gpu_style) == len(cpu) == (3 if kind == "two views" else 4)
    for got, expected in zip(gpu_style, cpu):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if got.dim() == 4:
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert got.std() > 0.1  # real images, not an empty buffer
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_shared_crop_branches_share_the_crop(betons):
    """Instance SimCLR's positives: one crop, two noise draws. Independent crops differ far more."""
    view = C.ViewConfig(resolution=28, crop_scale=(0.2, 0.5), flip_p=0, jitter_p=0,
                        grayscale_p=0, noise_p=1.0, noise_std=0.02)
    shared = C.make_ssl_loader(betons["train"], [view, view], batch_size=64, shared_crop=True,
                               normalize=False)
    apart = C.make_ssl_loader(betons["train"], [view, view], batch_size=64, normalize=False)
    s1, s2, _ = first(shared)
    a1, a2, _ = first(apart)
    d_shared = (s1.float() - s2.float()).abs().mean().item()
    d_apart = (a1.float() - a2.float()).abs().mean().item()
    assert not torch.equal(s1, s2)  # the noise differs
    # Two noise draws of std s apart: E|N(0, 2 s^2)| = 2 s / sqrt(pi) ~ 5.8 grey levels for
    # s = 0.02 * 255 (a little less where clipping at 0 or 255 cuts the noise).
    expected = 2 * 0.02 * 255 / np.sqrt(np.pi)
    assert 0.7 * expected < d_shared < 1.05 * expected, (d_shared, expected)
    assert d_apart > 3 * d_shared, (d_apart, d_shared)


def test_preview_writes_a_grid(betons, tmp_path):
    out = tmp_path / "views.png"
    C.preview(C.PreviewArgs(beton=betons["train"], out=str(out), resolution=32, num_images=3,
                            num_views=4))
    with Image.open(out) as im:
        assert im.size == (5 * 34 + 2, 3 * 34 + 2)  # torchvision's grid: 2 px padding
        assert np.asarray(im).std() > 10  # a picture, not a blank
    assert not list(tmp_path.glob("*.tmp*"))


# ---- errors: a clear message, never a hang ----
def test_missing_and_corrupt_beton(tmp_path, betons):
    with pytest.raises(FileNotFoundError, match="write_beton.py"):
        C.make_ssl_loader(str(tmp_path / "nope.beton"), C.simclr_views(), batch_size=8)
    truncated = tmp_path / "truncated.beton"
    truncated.write_bytes(open(betons["val"], "rb").read()[:50_000])
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(os.urandom(4096))
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match="not a valid .beton"):
            C.make_eval_loader(str(bad), 28, batch_size=8)


def test_beton_without_expected_fields(tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    path = str(tmp_path / "numbers.beton")
    DatasetWriter(path, {"number": IntField()}, num_workers=1).from_indexed_dataset(
        [(i,) for i in range(10)])
    with pytest.raises(ValueError, match="expected an RGB 'image'"):
        C.make_ssl_loader(path, C.simclr_views(), batch_size=4)


def test_batch_larger_than_data(betons):
    with pytest.raises(ValueError, match="fewer than one batch"):
        C.make_ssl_loader(betons["val"], C.simclr_views(), batch_size=1000)


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in the pipeline")


def test_error_in_loading_thread_reaches_the_training_loop(betons):
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.transforms import ToTensor

    loader = C.SSLLoader(betons["val"], outputs=["image"], batch_size=10, num_workers=1,
                         pipelines={"image": [CenterCropRGBImageDecoder((28, 28), 1.0),
                                              ToTensor(), Boom()], "label": None})
    caught = []

    def consume():
        try:
            next(iter(loader))
        except RuntimeError as err:
            caught.append(err)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the loader hung instead of raising"
    assert caught and "boom in the pipeline" in str(caught[0])


def test_negative_patch_box_is_uniform_over_free_places():
    """Against brute force: every returned place lies off the anchor when a free place exists,
    all free places come up, and with none free the box goes to the farthest corner."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = rng.integers(8, 30, 2)
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        ai, aj = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        free = {(i, j) for i in range(height - h + 1) for j in range(width - w + 1)
                if i + h <= ai or ai + h <= i or j + w <= aj or aj + w <= j}
        got = {C.negative_patch_box(np.uint64(1000 * trial + s), (ai, aj, h, w), height, width)
               for s in range(300)}
        assert {(hh, ww) for _, _, hh, ww in got} == {(h, w)}
        places = {(i, j) for i, j, _, _ in got}
        if free:
            assert places <= free
            if len(free) <= 20:  # 300 draws cover 20 places (miss one: p < 20 * 0.95^300)
                assert places == free
        else:
            far_i = 0 if ai >= height - h - ai else height - h
            far_j = 0 if aj >= width - w - aj else width - w
            assert places == {(far_i, far_j)}


def coordinate_beton(path, n=12, side=64):
    """Raw RGB images whose red = 4 x row, green = 4 x column, blue = 20 x image number: a patch
    tells where it was cut from, and from which image."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rows, cols = np.mgrid[0:side, 0:side]

    class Data:
        def __len__(self):
            return n

        def __getitem__(self, k):
            image = np.stack([4 * rows, 4 * cols, np.full_like(rows, 20 * k)], -1)
            return image.astype(np.uint8), k

    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Data())
    return str(path)


def test_instance_patches_share_the_crop_and_negatives_avoid_it(tmp_path):
    """Positives: the same patch. Negatives: a patch of the same size from the same image that
    does not overlap it (patches are at most 1/3 of the side, so a free place always exists)."""
    beton = coordinate_beton(tmp_path / "coords.beton")
    plain = C.ViewConfig(resolution=16, crop_scale=(0.02, 0.08), flip_p=0, jitter_p=0,
                         grayscale_p=0)
    loader = C.make_ssl_loader(beton, [plain, plain], batch_size=12, shared_crop=True,
                               negatives=[plain, plain], normalize=False)

    def box(patch):  # (3, R, R) -> top, bottom, left, right in image pixels, from the colours
        red, green = patch[0].float() / 4, patch[1].float() / 4
        return red.min().item(), red.max().item(), green.min().item(), green.max().item()

    checked = 0
    for _ in range(3):  # three epochs: different crops
        a1, a2, n1, n2, labels = [t.clone() for t in first(loader)]
        assert torch.equal(a1, a2)
        for k in range(12):
            image_id = labels[k].item() * 20
            for neg in (n1[k], n2[k]):
                assert (neg[2] == image_id).all() and (a1[k][2] == image_id).all()
                at, ab, al, ar = box(a1[k])
                nt, nb, nl, nr = box(neg)
                # same size, within resampling error
                assert abs((ab - at) - (nb - nt)) <= 1.5 and abs((ar - al) - (nr - nl)) <= 1.5
                # disjoint: apart along the rows or along the columns (1 px of resampling blur)
                assert nt >= ab - 1 or nb <= at + 1 or nl >= ar - 1 or nr <= al + 1, (
                    (at, ab, al, ar), (nt, nb, nl, nr))
                checked += 1
            assert not torch.equal(n1[k], n2[k])  # two different negatives
    assert checked == 72
    with pytest.raises(ValueError, match="shared_crop"):
        C.make_ssl_loader(beton, [plain, plain], batch_size=12, negatives=[plain])


def test_two_files_interleaved_every_image_once_and_resumable(betons, unlabelled_beton):
    """Two .beton files as one training set: 320 labelled + 192 unlabelled images, batch 64 ->
    5 + 3 batches per epoch, each image once, the files' batches in a seeded random order; a
    loader told to skip the first k batches yields exactly the rest of that epoch."""
    views = [C.ViewConfig(resolution=16)]
    loader = C.make_ssl_loader([betons["train"], unlabelled_beton], views, batch_size=64,
                               num_workers=1, seed=3)
    assert isinstance(loader, C.InterleavedLoader) and len(loader) == 8
    epoch0, flags = [], []
    for batch in loader:
        epoch0.append([t.clone() for t in batch])
        flags.append(loader.labelled)  # what the training loop reads: no look at y, no sync
    sources = [int((y >= 0).all()) for _, y in epoch0]  # 1: the labelled file
    assert flags == [bool(k) for k in sources]
    assert sum(sources) == 5 and len(sources) == 8
    assert all(((y >= 0).all() or (y == -1).all()) for _, y in epoch0)  # one file per batch
    labels = torch.cat([y for _, y in epoch0 if (y >= 0).all()])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 32))
    assert list(loader.sources(0)) == [1 - s for s in sources]  # file 0 is the labelled one
    assert any(not np.array_equal(loader.sources(0), loader.sources(e)) for e in range(1, 5))
    for skip in (3, 6):
        loader.next_epoch, loader.skip_batches = 0, skip
        rest = [[t.clone() for t in batch] for batch in loader]
        assert len(rest) == 8 - skip
        for (x, y), (x0, y0) in zip(rest, epoch0[skip:]):
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_subset_indices_over_several_files(betons, unlabelled_beton):
    picked = C.subset_indices([betons["train"], unlabelled_beton], 200, seed=1)
    assert len(picked) == 2 and sum(len(p) for p in picked) == 200
    assert picked[0].max() < 320 and picked[1].max() < 192 and len(picked[1]) > 0
    again = C.subset_indices([betons["train"], unlabelled_beton], 200, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(picked, again))
    with pytest.raises(ValueError, match="a subset of 600 images"):
        C.subset_indices([betons["train"], unlabelled_beton], 600)


def test_eval_centre_crop_matches_torchvision(tmp_path):
    """The evaluation crop on real photos of several shapes (raw pixels, no JPEG): the centred
    square of int(0.875 x short side), resized as torchvision's center_crop + resize
    (bilinear, antialias=True) would, within one grey level."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    import torchvision.transforms.functional as TF

    from conftest import photos

    shapes = [(300, 200), (97, 131), (512, 512), (40, 90)]
    images = [np.ascontiguousarray(p[:h, :w]) for p, (h, w) in zip(photos(), shapes)]

    class Data:
        def __len__(self):
            return len(images)

        def __getitem__(self, k):
            return images[k], k

    path = str(tmp_path / "photos.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Data())
    for side in (24, 160):  # shrinking all of them; enlarging some
        got, _ = collect(C.make_eval_loader(path, side, batch_size=4, normalize=False,
                                            crop_ratio=0.875))
        for img, out in zip(images, got):
            h, w = img.shape[:2]
            c = int(0.875 * min(h, w))
            ref = TF.resized_crop(torch.from_numpy(img).permute(2, 0, 1), (h - c) // 2,
                                  (w - c) // 2, c, c, [side, side], antialias=True)
            diff = (out.int() - ref.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, (side, shapes)


def test_quasi_random_order_every_image_once_and_resumed_exactly(betons):
    """order="quasi_random" (ffcv's QUASI_RANDOM, for data larger than RAM) with os_cache=False:
    each epoch every image once, a new order each epoch, and a fresh loader started at epoch 2
    (a resumed run), also mid-epoch, yields the uninterrupted loader's batches. ffcv's order
    shuffles its page table in place (epoch 2's order depends on epochs 0 and 1 having been
    drawn), so the loader replays the earlier epochs' draws: checked to matter."""
    def make(**kw):
        return C.make_ssl_loader(betons["train"], [C.ViewConfig(resolution=16)], batch_size=64,
                                 num_workers=1, seed=3, order="quasi_random", os_cache=False, **kw)

    run = make()
    epochs = [collect(run) for _ in range(3)]
    for view, labels in epochs:
        assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 32))
    assert not torch.equal(epochs[0][1], epochs[1][1]) and not torch.equal(epochs[1][1],
                                                                           epochs[2][1])
    resumed = make()
    resumed.next_epoch = 2
    assert all(torch.equal(a, b) for a, b in zip(collect(resumed), epochs[2]))
    resumed.next_epoch, resumed.skip_batches = 2, 3  # after 3 of its 5 batches
    assert all(torch.equal(a, b[3 * 64:]) for a, b in zip(collect(resumed), epochs[2]))
    # Without the replay, epoch 2's order would differ.
    order = resumed.traversal_order
    order.page_to_samples_array = resumed._initial_pages.copy()
    drawn_first = order.sample_order(2).copy()
    order.page_to_samples_array = resumed._initial_pages.copy()
    replayed = [order.sample_order(e).copy() for e in range(3)][2]
    assert sorted(drawn_first) == sorted(replayed) and list(drawn_first) != list(replayed)
    with pytest.raises(ValueError, match="not available under DDP"):
        make(distributed=True)
    with pytest.raises(ValueError, match="use 'random' or 'quasi_random'"):
        C.make_ssl_loader(betons["train"], [C.ViewConfig(resolution=16)], 64, order="shuffle")


# ---- decoding JPEGs: once per image, only what the crops need ----
@pytest.fixture(scope="module")
def jpeg_photos(tmp_path_factory):
    """24 crops (180-512 px a side) of real photos stored as JPEG (quality 90) in a .beton."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from conftest import photos

    rng = np.random.default_rng(3)
    images = []
    for k in range(24):
        p = photos()[k % 4]
        h, w = (int(rng.integers(180, min(p.shape[0], 512) + 1)),
                int(rng.integers(180, min(p.shape[1], 512) + 1)))
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        images.append((np.ascontiguousarray(p[y:y + h, x:x + w]), k % 4))
    path = str(tmp_path_factory.mktemp("jpeg") / "photos.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                         "label": IntField()}, num_workers=1).from_indexed_dataset(images)
    return path


def test_jpeg_decode_plan_scale_and_region():
    boxes = np.array([[40, 70, 300, 260]], np.int64)  # i, j, h, w
    # 32 px views: 260 >= 2 * 4 * 2 * 32 is false, >= 2 * 2 * 2 * 32 true: decode at 1/4.
    y0, x0, rh, rw, d, cut = C.jpeg_decode_plan(boxes, 400, 500, 32, 32, 0.0, 2.0)
    assert (y0, x0, rh, rw, d, cut) == (0, 0, 400, 500, 4, False)
    # 224 px views: no reduction; a margin of 1 allows 1/1 only too (260 < 2 * 224).
    assert C.jpeg_decode_plan(boxes, 400, 500, 224, 224, 0.0, 1.0)[4] == 1
    # Cutting (region <= max area): the top-left corner goes down to the 16-pixel MCU grid and
    # the region still ends where the box ends.
    y0, x0, rh, rw, d, cut = C.jpeg_decode_plan(boxes, 400, 500, 32, 32, 1.0, 2.0)
    assert cut and (y0, x0) == (32, 64) and (y0 + rh, x0 + rw) == (340, 330)
    # Two boxes: their union is decoded; the smaller box sets the scale.
    two = np.array([[40, 70, 300, 260], [200, 10, 70, 90]], np.int64)
    y0, x0, rh, rw, d, cut = C.jpeg_decode_plan(two, 400, 500, 32, 32, 1.0, 1.0)
    assert (y0, x0, y0 + rh, x0 + rw, d) == (32, 0, 340, 330, 2)  # 70 >= 2 * 32: 1/2
    assert C.jpeg_decode_plan(two, 400, 500, 32, 32, 1.0, 2.0)[4] == 1  # 70 < 2 * 2 * 32
    assert not C.jpeg_decode_plan(two, 400, 500, 32, 32, 0.4, 1.0)[5]  # 48% of the image: whole


def test_resample_box_at_a_reduced_scale_matches_the_full_image():
    """A box resampled from the image shrunk 2x by averaging 2x2 blocks (what a JPEG decoded at
    1/2 approximates) is within a grey level or two of the box resampled from the full image,
    when the box is >= 4x the output: fractional box edges are placed right (an off-by-one
    would move the whole view by a pixel)."""
    from conftest import photos

    img = photos(512)[0]
    half = img.reshape(256, 2, 256, 2, 3).astype(np.float64).mean((1, 3)).round().astype(np.uint8)
    for (i, j, h, w) in [(37, 81, 301, 263), (0, 0, 512, 512), (211, 5, 256, 300)]:
        ref = np.zeros((48, 48, 3), np.uint8)
        got = np.zeros((48, 48, 3), np.uint8)
        C.resize_crop_antialias(img, i, i + h, j, j + w, ref)
        C.resample_box(half, i / 2, h / 2, j / 2, w / 2, got)
        diff = np.abs(ref.astype(int) - got.astype(int))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (i, j, h, w, diff.mean())
        shifted = np.zeros_like(got)  # the same box one pixel of the half image off
        C.resample_box(half, i / 2 + 1, h / 2, j / 2 + 1, w / 2, shifted)
        assert np.abs(ref.astype(int) - shifted.astype(int)).mean() > 2 * diff.mean()


def _views(path, views, **kw):
    return collect(C.make_ssl_loader(path, views, batch_size=8, num_workers=2, normalize=False,
                                     seed=5, **kw))


def test_views_cut_from_one_decode_equal_one_decoder_per_view(jpeg_photos):
    """MultiViewCrop (one decode per image for both views) gives exactly the views of one
    decoder per view, augmentations included (BYOL's: blur, solarisation)."""
    views = C.byol_views(40)
    once = _views(jpeg_photos, views, partial_decode=False)
    per_view = _views(jpeg_photos, views, partial_decode=False, decode_once=False)
    assert len(once) == 3 and once[0].shape == (24, 3, 40, 40)
    for a, b in zip(once, per_view):
        assert torch.equal(a, b)
    assert not torch.equal(once[0], once[1])  # two different views


def test_decoding_once_with_partial_decoding_stays_within_a_fraction_of_a_grey_level(
        jpeg_photos):
    """The default path (partial decoding on): one decode for both views picks its scale and
    region from both boxes, so a view may be resampled from another scale than its own decoder
    would have used. Measured: 0.02-0.23 grey levels on average; the bound is the documented
    tolerance (ffcv_ssl_common.MultiViewCrop)."""
    views = C.simclr_views(32)
    once, per_view = _views(jpeg_photos, views), _views(jpeg_photos, views, decode_once=False)
    for a, b in zip(once[:2], per_view[:2]):
        diff = (a.float() - b.float()).abs()
        assert diff.mean() < 0.5 and diff.mean((1, 2, 3)).max() < 2.0, diff.mean()
        assert (diff == 0).float().mean() > 0.7  # most pixels are the same
    assert not torch.equal(once[0], once[1])


def test_jpeg_pixels_against_pil(tmp_path):
    """What the loader decodes from a stored JPEG (no crop, no resize: a 64 px square at 64 px)
    against PIL's decode of the same bytes: ffcv's libjpeg-turbo call uses the fast integer
    IDCT (TJFLAG_FASTDCT), PIL the accurate one: about one grey level apart, a few at most. The
    same images stored raw come back exactly."""
    import io

    import cv2
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from conftest import photos

    squares = [np.ascontiguousarray(photos()[k % 4][10 * k:10 * k + 64, 10 * k:10 * k + 64])
               for k in range(8)]
    for mode in ("jpg", "raw"):
        path = str(tmp_path / f"{mode}.beton")
        DatasetWriter(path, {"image": RGBImageField(write_mode=mode, jpeg_quality=90),
                             "label": IntField()}, num_workers=1).from_indexed_dataset(
            [(im, 0) for im in squares])
        x, _ = next(iter(C.make_eval_loader(path, 64, 8, normalize=False)))
        for k, im in enumerate(squares):
            ours = x[k].permute(1, 2, 0).numpy().astype(int)
            if mode == "raw":
                assert (ours == im).all()
                continue
            # ffcv's writer encodes with OpenCV (BGR in); the same call gives the same bytes
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 90])
            pil = np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB")).astype(int)
            diff = np.abs(ours - pil)
            assert diff.mean() < 1.5 and diff.max() <= 8, (diff.mean(), diff.max())
            assert np.abs(ours - im).mean() > diff.mean()  # vs the source: JPEG's own loss


def test_one_eighth_scale_decoding_of_large_crops(tmp_path):
    """Crops of 900+ px for 32 px views are decoded at 1/8 scale (jpeg_decode_plan): within a
    grey level on average of decoding every pixel."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from conftest import photos

    big = [np.asarray(Image.fromarray(p).resize((1100, 1000), Image.BICUBIC)) for p in photos()]
    path = str(tmp_path / "big.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                         "label": IntField()}, num_workers=1).from_indexed_dataset(
        [(im, 0) for im in big * 2])
    boxes = np.array([[50, 60, 900, 950]], np.int64)
    assert C.jpeg_decode_plan(boxes, 1000, 1100, 32, 32, C.JPEG_CROP_MAX_AREA,
                              C.JPEG_SCALE_MARGIN)[4] == 8
    bare = C.ViewConfig(resolution=32, crop_scale=(0.85, 1.0), flip_p=0, jitter_p=0,
                        grayscale_p=0)
    scaled = collect(C.make_ssl_loader(path, [bare], 8, 1, seed=2, normalize=False))[0]
    exact = collect(C.make_ssl_loader(path, [bare], 8, 1, seed=2, normalize=False,
                                      partial_decode=False))[0]
    diff = (scaled.float() - exact.float()).abs()
    assert 0 < diff.mean() < 1.0, diff.mean()


def test_partial_jpeg_decoding_stays_within_a_grey_level(jpeg_photos, monkeypatch):
    """Decoding JPEGs at a reduced scale (32 px views of 180-512 px photos: 1/2 and 1/4), and
    cutting the JPEG to the crops' region before decoding (forced for every image here), against
    decoding every pixel: within one grey level on average, and the worst image within 1.5."""
    bare = C.ViewConfig(resolution=32, crop_scale=(0.3, 1.0), flip_p=0, jitter_p=0,
                        grayscale_p=0)
    exact = _views(jpeg_photos, [bare, bare], partial_decode=False, decode_once=False)[:2]
    scaled = _views(jpeg_photos, [bare, bare])[:2]
    monkeypatch.setattr(C, "JPEG_CROP_MAX_AREA", 1.0)
    cut = _views(jpeg_photos, [bare, bare])[:2]
    for got in (scaled, cut):
        for a, b in zip(exact, got):
            diff = (a.float() - b.float()).abs()
            assert diff.mean() < 1.0 and diff.mean((1, 2, 3)).max() < 1.5, diff.mean()
            assert not torch.equal(a, b)  # the reduced decode did run
    # A wrong region (the cut's offset ignored) would be far off: the check can fail.
    assert (exact[0].float() - exact[0].roll(3, dims=3).float()).abs().mean() > 3


def test_samples_read_from_every_page_with_and_without_the_os_cache(tmp_path):
    """read_sample (our decoders' reader, standing in for ffcv's compiled one) on a file of
    several 2 MiB pages: the written pixels back, in order, through the OS page cache and
    through ffcv's own page cache (os_cache=False: pages at slots, samples at page offsets)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from conftest import photos

    images = [(np.ascontiguousarray(photos()[k % 4][k:k + 200, 2 * k:2 * k + 200]), k % 10)
              for k in range(40)]  # 40 x 120 KB stored raw: 3 pages
    path = str(tmp_path / "pages.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  page_size=1 << 21, num_workers=1).from_indexed_dataset(images)
    expected = torch.from_numpy(np.stack([img for img, _ in images])).permute(0, 3, 1, 2)
    for os_cache in (True, False):
        x, y = collect(C.make_eval_loader(path, 200, batch_size=16, normalize=False,
                                          os_cache=os_cache))
        assert torch.equal(x, expected), os_cache
        assert torch.equal(y, torch.tensor([label for _, label in images]))


FIRST_BATCH = COUNT_COMPILES + """
import ffcv_ssl_common as C
from ffcv.fields.rgb_image import IMAGE_MODES
assert IMAGE_MODES["jpg"] == C.JPG
for loader in (C.make_ssl_loader(sys.argv[2], C.byol_views(24), batch_size=16, num_workers=2),
               C.make_eval_loader(sys.argv[2], 24, batch_size=16)):
    next(iter(loader))
print(ours_compiled())
"""


def test_a_new_process_compiles_none_of_our_code(jpeg_photos, tmp_path):
    """Every function of ours that a loader runs, the operations' code ffcv compiles included,
    is in numba's on-disk cache: a second process building the same loaders compiles none of it
    (the first may: a cold cache). ffcv's own compile in every process (its reader, labels)."""
    import subprocess
    import sys

    script = tmp_path / "first_batch.py"
    script.write_text(FIRST_BATCH)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    counts = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script), root, jpeg_photos],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        counts.append(int(done.stdout.split()[-1]))
    assert counts[1] == 0, counts


def test_an_unfinished_epoch_is_stopped_and_its_thread_ends(betons):
    """ffcv's loading thread keeps an unfinished epoch (and its batch buffers) forever; a new
    epoch, or close(), stops it, also when the thread is stuck in the epoch's final put, which
    has no timeout (5 batches, 3 ahead: after 2 batches taken, 3 wait in the queue and the
    end-of-epoch marker cannot get in)."""
    import time

    loader = C.make_ssl_loader(betons["train"], C.byol_views(32), batch_size=64,
                               num_workers=2, seed=0)  # as `train`: its compiled code
    it = iter(loader)
    next(it)
    again = iter(loader)  # a new epoch stops the first one
    assert not it.is_alive() and again.is_alive()
    next(again), next(again)
    deadline = time.time() + 60
    while not again.output_queue.full() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the thread is now in its final put
    assert again.is_alive() and again.output_queue.full()
    closing = threading.Thread(target=loader.close, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive() and not again.is_alive()
    # The loader still works, from where a resumed run would start.
    loader.next_epoch, loader.skip_batches = 0, 1
    assert len(collect(loader)[0]) == 4 * 64


def test_close_starts_no_batch_after_it_is_called(betons, monkeypatch):
    """close() used to set ffcv's terminate flag and wait: the thread, which reads that flag only
    when a put has waited 0.5 s on a full queue, first filled the queue (3 more batches here,
    each with a blur at 96 px), then waited; ~2 s at 112 px, a third of a benchmark's timed
    epoch after its warm-up break. Now it starts no new batch (at most one it had already taken
    its indices for) and the queue is emptied for its last puts."""
    import time

    started = []
    original = C._EpochIterator.run_pipeline

    def counting(self, *args):
        started.append(time.perf_counter())
        return original(self, *args)

    monkeypatch.setattr(C._EpochIterator, "run_pipeline", counting)
    loader = C.make_ssl_loader(betons["train"], C.byol_views(96), batch_size=32, num_workers=1)
    it = iter(loader)
    next(it), next(it)  # the thread now makes batch 3, with room in the queue (3 ahead)
    called = time.perf_counter()
    loader.close()
    assert not it.is_alive() and loader._epoch is None
    assert sum(t > called for t in started) <= 1, (len(started), started)
    assert len(collect(loader)[0]) == len(loader) * 32  # and the next epoch is whole


LEFT_MID_EPOCH = """
import atexit, sys
checks = []
# Registered before ffcv_ssl_common's own handler, so it runs after it (atexit is last in, first out).
atexit.register(lambda: print("closed at exit:", checks[0]._epoch is None and not checks[1].is_alive()))
sys.path.insert(0, sys.argv[1])
import ffcv_ssl_common as C
loader = C.make_ssl_loader(sys.argv[2], C.simclr_views(16), batch_size=16, num_workers=2)
next(iter(loader))
checks += [loader, loader._epoch]
"""


def test_a_loader_left_mid_epoch_is_closed_at_exit(betons, tmp_path):
    """A program that ends with a loader mid-epoch: its loading thread, still computing batches
    in numba's thread pool when Python ended it, aborted 3 of 18 such processes at exit
    ("terminate called without an active exception"). ffcv_ssl_common closes every loader at exit,
    before the interpreter stops the thread."""
    import subprocess
    import sys

    script = tmp_path / "left.py"
    script.write_text(LEFT_MID_EPOCH)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script), root, betons["train"]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "closed at exit: True" in done.stdout, done.stdout


def test_every_random_stream_of_a_loader_is_its_own(betons):
    """Each view's crop and each of its operations draw from their own seed (a view's crop,
    then its operations at their seed_offset below SEEDS_PER_VIEW): no two streams of a
    loader share a seed, with every augmentation on, two views and negative patches."""
    full = C.ViewConfig(resolution=16, blur_p=0.5, solarize_p=0.2, noise_p=0.5, noise_std=0.1)
    for kwargs in ({}, {"decode_once": False},
                   {"shared_crop": True, "negatives": [full, full]}):
        loader = C.make_ssl_loader(betons["train"], [full, replace(full, hue=0.2)], 16,
                                   seed=3, **kwargs)
        seeds, crops = [], set()
        for spec in loader.pipeline_specs.values():
            decoder = getattr(spec, "decoder", None)
            if isinstance(decoder, C.MultiViewCrop):
                crops.update(decoder.seeds)
            elif isinstance(decoder, C.RandomResizedCrop):
                crops.add(decoder.seed)
            for op in getattr(spec, "transforms", None) or []:
                if isinstance(op, C.AugmentChain):
                    seeds += [o.seed for o in op.ops]
        streams = seeds + sorted(crops)
        assert len(seeds) == 6 * (2 + len(kwargs.get("negatives", [])))
        assert len(set(streams)) == len(streams), kwargs
