"""write_beton.py on data the tests make: Fashion-MNIST-format idx files and image folders of real
JPEGs, the write modes and options, and every bad input it must refuse with one clear line."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from ffcv.reader import Reader

import write_beton
from conftest import ROOT, make_image_folder, photos


def args(**kw):
    return write_beton.Args(num_workers=1, **kw)


def modes(path):
    return Reader(path).metadata["f0"]["mode"]  # 0: jpg, 1: raw


def test_fashion_mnist_round_trip_and_subset(idx_dir, tmp_path):
    out = tmp_path / "out"
    paths = write_beton.main(args(data_dir=str(idx_dir), out_dir=str(out), subset=50, seed=3))
    assert [os.path.basename(p) for p in paths] == ["fashion-mnist_train.beton",
                                                    "fashion-mnist_val.beton"]
    for p in paths:
        reader = Reader(p)
        assert reader.num_samples == 50
        meta = reader.metadata["f0"]
        assert (meta["height"] == 28).all() and (meta["width"] == 28).all()
        assert (modes(p) == 1).all()
    assert sorted(os.listdir(out)) == ["fashion-mnist_train.beton", "fashion-mnist_val.beton"]


def test_refuses_to_overwrite_unless_asked(idx_dir, tmp_path):
    write_beton.main(args(data_dir=str(idx_dir), out_dir=str(tmp_path), subset=10))
    before = os.path.getmtime(tmp_path / "fashion-mnist_train.beton")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        write_beton.main(args(data_dir=str(idx_dir), out_dir=str(tmp_path), subset=10))
    write_beton.main(args(data_dir=str(idx_dir), out_dir=str(tmp_path), subset=20,
                          overwrite=True))
    assert Reader(str(tmp_path / "fashion-mnist_train.beton")).num_samples == 20
    assert os.path.getmtime(tmp_path / "fashion-mnist_train.beton") >= before


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"))


def test_image_folder_of_real_jpegs(jpeg_folder, tmp_path):
    paths = write_beton.main(args(dataset="imagefolder", data_dir=str(jpeg_folder),
                                  out_dir=str(tmp_path), name="photos", max_resolution=64,
                                  write_mode="jpg", jpeg_quality=85))
    train = Reader(paths[0])
    assert train.num_samples == 24
    meta = train.metadata["f0"]
    assert max(meta["height"].max(), meta["width"].max()) == 64  # downscaled, aspect kept
    assert (modes(paths[0]) == 0).all()
    labels = train.metadata["f1"]
    assert np.array_equal(labels, np.repeat(np.arange(4), 6))  # ImageFolder's class order

    # Pixels: each decoded image's mean colour matches its source JPEG's, centre-cropped the same
    # way (JPEG at quality 85 and downscaling change pixels a little, not the average).
    import ffcv_ssl_common as C
    import torch
    from PIL import Image

    loader = C.make_eval_loader(paths[0], 32, batch_size=24, normalize=False, num_workers=1)
    x, y = next(iter(loader))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    sources = sorted((jpeg_folder / "train").glob("class*/*.jpg"))
    for decoded, source in zip(x, sources):
        with Image.open(source) as im:
            w, h = im.size
            s = min(w, h)
            crop = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            expected = np.asarray(crop, np.float64).mean(axis=(0, 1))
        got = decoded.double().mean(dim=(1, 2)).numpy()
        assert np.abs(got - expected).max() < 6, (source, got, expected)


def test_write_modes_proportion_and_smart(jpeg_folder, tmp_path):
    p = write_beton.main(args(dataset="imagefolder", data_dir=str(jpeg_folder),
                              out_dir=str(tmp_path / "p"), write_mode="proportion",
                              compress_probability=0.5))[0]
    share = (modes(p) == 0).mean()
    assert 0.15 < share < 0.85  # 24 coin flips at 0.5
    s = write_beton.main(args(dataset="imagefolder", data_dir=str(jpeg_folder),
                              out_dir=str(tmp_path / "s"), write_mode="smart",
                              smart_threshold=100 * 100 * 3))[0]
    meta = Reader(s).metadata["f0"]
    big = meta["height"].astype(int) * meta["width"] * 3 > 100 * 100 * 3
    assert np.array_equal(modes(s) == 0, big)


def test_unreadable_image_stops_with_its_name_and_leaves_nothing(tmp_path):
    folder = make_image_folder(tmp_path / "src", per_class=2, corrupt="train")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"unreadable image.*broken\.jpg"):
        write_beton.main(args(dataset="imagefolder", data_dir=str(folder), out_dir=str(out)))
    assert os.listdir(out) == []  # no .beton, no temporary file, no error log


@pytest.mark.parametrize("setup,message", [
    ("missing", "does not exist"),
    ("empty", "no images in"),
])
def test_bad_image_folders(tmp_path, setup, message):
    root = tmp_path / "root"
    if setup == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    with pytest.raises(SystemExit, match=message):
        write_beton.main(args(dataset="imagefolder", data_dir=str(root), out_dir=str(tmp_path)))


def test_bad_fashion_mnist_sources(tmp_path):
    with pytest.raises(SystemExit, match=r"train-images-idx3-ubyte\[\.gz\] not found"):
        write_beton.main(args(data_dir=str(tmp_path), out_dir=str(tmp_path / "o")))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"this is not gzip")
    with pytest.raises(SystemExit, match="cannot read idx file"):
        write_beton.main(args(data_dir=str(tmp_path), out_dir=str(tmp_path / "o")))


def test_bad_options(idx_dir, tmp_path):
    with pytest.raises(SystemExit, match="jpeg-quality"):
        write_beton.main(args(data_dir=str(idx_dir), out_dir=str(tmp_path), jpeg_quality=0))
    with pytest.raises(SystemExit, match="needs --data-dir"):
        write_beton.main(args(dataset="imagefolder", out_dir=str(tmp_path)))


def test_offline_torchvision_source_fails_clearly(tmp_path):
    # No network here: torchvision's download fails; the message says what to do.
    with pytest.raises(SystemExit, match="cannot load cifar10 from"):
        write_beton.main(args(dataset="cifar10", data_dir=str(tmp_path / "raw"),
                              out_dir=str(tmp_path)))


def test_cli_unknown_dataset():
    from conftest import run_in_process

    status, _, stderr = run_in_process("write_beton.py", "--dataset", "mnist3d")
    assert status != 0
    assert "mnist3d" in stderr and "fashion-mnist" in stderr


def test_photos_are_real():
    # The realistic-JPEG tests rely on scikit-image's bundled photos being actual photographs.
    assert all(p.ndim == 3 and p.std() > 30 for p in photos())


def test_val_split_takes_the_training_splits_classes(tmp_path):
    """val/ without class1: its class2 and class3 images keep train's labels 2 and 3 (numbered
    on its own, they would become 1 and 2); a class only val/ has is refused."""
    import shutil

    root = make_image_folder(tmp_path / "src", per_class=2)
    shutil.rmtree(root / "val" / "class1")
    paths = write_beton.main(args(dataset="imagefolder", data_dir=str(root),
                                  out_dir=str(tmp_path / "out")))
    assert np.array_equal(Reader(paths[1]).metadata["f1"], [0, 0, 2, 2, 3, 3])
    (root / "val" / "zebra").mkdir()
    shutil.copy(root / "val" / "class0" / "0.jpg", root / "val" / "zebra" / "0.jpg")
    with pytest.raises(SystemExit, match="class folder.*zebra.*training split lacks"):
        write_beton.main(args(dataset="imagefolder", data_dir=str(root),
                              out_dir=str(tmp_path / "out2")))


def image_folder(root, images):
    """root/{train,val}/c0/<k>.png from a list of PIL images (both splits the same)."""
    for split in ("train", "val"):
        folder = root / split / "c0"
        folder.mkdir(parents=True)
        for k, image in enumerate(images):
            image.save(folder / f"{k}.png")
    return root


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_stored_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit values: every pixel above 255 became 255."""
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)
    image = Image.fromarray(ramp)  # mode I;16: 0 .. 65520
    assert image.mode.startswith("I;16")
    root = image_folder(tmp_path / "src", [image])
    write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=str(root),
                                      out_dir=str(tmp_path), name="deep", num_workers=1))
    stored = write_beton.rgb8(image)
    assert stored.shape == (64, 64, 3) and (stored[..., 0] == stored[..., 2]).all()
    np.testing.assert_array_equal(stored[..., 0], np.round(ramp / 257).astype(np.uint8))
    reader = Reader(str(tmp_path / "deep_train.beton"))
    assert reader.num_samples == 1
    import ffcv_ssl_common as C

    x, _ = next(iter(C.make_eval_loader(str(tmp_path / "deep_train.beton"), 64, 1,
                                        normalize=False)))
    np.testing.assert_array_equal(x[0, 0].numpy(), stored[..., 0])  # not all white


def test_a_side_that_the_resize_would_make_zero_is_kept_at_one_pixel(tmp_path):
    """A 2000 x 20 image at --max-resolution 64: ffcv's resize gives 64 x 0, and its writer
    process died with the parent waiting forever. Now it is stored as 64 x 1."""
    from PIL import Image

    wide = Image.fromarray(np.full((20, 2000, 3), 200, np.uint8))
    root = image_folder(tmp_path / "src", [wide, Image.fromarray(np.zeros((30, 30, 3), np.uint8))])
    write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=str(root), num_workers=2,
                                      out_dir=str(tmp_path), name="wide", max_resolution=64))
    meta = Reader(str(tmp_path / "wide_train.beton")).metadata["f0"]
    assert sorted(zip(meta["width"].tolist(), meta["height"].tolist())) == [(30, 30), (64, 1)]


@pytest.mark.parametrize("where,count", [("sample", 20000), ("last flush", 300)])
def test_a_writer_process_that_dies_ends_the_write_in_one_line(tmp_path, where, count):
    """A full disk (or any error inside ffcv's writer processes): the parent used to wait
    forever. One process fails as a full disk does, on an image ("sample"; 20,000 images: more
    chunks of work than a pipe holds, so exiting must not wait to send them) or when it writes its
    last page after every image was counted ("last flush": ffcv then blocks reading that
    process's report). write_beton runs in its own interpreter with SIGINT ignored, as in a job
    that a script starts with `&`: there `_thread.interrupt_main()` did nothing and the write
    hung (2 of 3 fresh-clone suites). On a hang, faulthandler prints where the parent waits."""
    from conftest import label_images, write_idx

    for prefix in ("train", "t10k"):
        images, labels = label_images(count)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    script = f"""
import faulthandler, os, signal, sys
faulthandler.dump_traceback_later(100, exit=True)
assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
sys.path.insert(0, {ROOT!r})
import ffcv.memory_allocator, ffcv.writer
import write_beton

if {where!r} == "sample":
    real = ffcv.writer.handle_sample

    def full_disk(sample, dest_ix, *rest):
        if dest_ix == 150:
            raise OSError(28, "No space left on device")
        return real(sample, dest_ix, *rest)

    ffcv.writer.handle_sample = full_disk  # forked: the workers' too
else:
    real = ffcv.memory_allocator.MemoryAllocator.__exit__

    def last_flush_fails(self, *exc):
        real(self, *exc)
        try:  # the first process to get here fails, once
            os.close(os.open({str(tmp_path / "flag")!r}, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        raise OSError(28, "No space left on device")

    ffcv.memory_allocator.MemoryAllocator.__exit__ = last_flush_fails
write_beton.main(write_beton.Args(data_dir={str(tmp_path)!r}, out_dir={str(tmp_path / "o")!r},
                                  name="full", num_workers=2))
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _, stderr = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the writer processes too
        pytest.fail("write_beton.main hung after a writer process died: "
                    + child.communicate()[1][-8000:])
    message = stderr.strip().splitlines()[-1]
    assert child.returncode == 1, stderr[-3000:]
    assert message.startswith("error: a writer process failed"), stderr[-3000:]
    assert "No space left on device" in message and "nothing was written" in message
    assert os.listdir(tmp_path / "o") == []  # no .beton, no temporary file, no logs


def test_an_out_dir_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="^error: --out-dir .*afile is a file, not a folder"):
        write_beton.validate(write_beton.Args(out_dir=str(tmp_path / "afile" / "sub")))
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else
                        real(p, mode))  # a read-only folder (this test may run as root)
    with pytest.raises(SystemExit, match=f"^error: --out-dir .*{tmp_path} is not writable"):
        write_beton.validate(write_beton.Args(out_dir=str(tmp_path)))


def test_max_short_side_keeps_the_aspect_ratio_and_never_enlarges(tmp_path):
    from PIL import Image

    images = [Image.fromarray(np.full((100, 300, 3), 100, np.uint8)),  # -> 50 x 150
              Image.fromarray(np.full((40, 60, 3), 100, np.uint8))]    # small: kept
    root = image_folder(tmp_path / "src", images)
    write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=str(root), num_workers=1,
                                      out_dir=str(tmp_path), name="s", max_short_side=50))
    meta = Reader(str(tmp_path / "s_train.beton")).metadata["f0"]
    assert sorted(zip(meta["width"].tolist(), meta["height"].tolist())) == [(60, 40), (150, 50)]


def test_colour_fashion_mnist_is_seeded_and_its_colour_says_nothing_of_the_class(idx_dir,
                                                                                tmp_path):
    """fashion-mnist-colour: each image tinted with its own random foreground and background
    colours (the gray levels kept as the blend), the same file for the same seed, and the colours
    independent of the labels."""
    import ffcv_ssl_common as C

    for k in (0, 1):
        write_beton.main(write_beton.Args(dataset="fashion-mnist-colour", data_dir=str(idx_dir),
                                          out_dir=str(tmp_path / str(k)), num_workers=1))
    a, b = (str(tmp_path / str(k) / "fashion-mnist-colour_train.beton") for k in (0, 1))
    assert C.fingerprint(a)["sha256"] == C.fingerprint(b)["sha256"]
    x, y = next(iter(C.make_eval_loader(a, 28, 320, normalize=False)))
    x = x.float()
    gray = write_beton.fashion_mnist(str(idx_dir))["train"].images[:320].astype(np.float32)
    per_image = x.mean((2, 3))  # (N, 3) mean colour
    assert (x[:, 0] != x[:, 1]).float().mean() > 0.5  # coloured, not gray
    # the blend: each channel is an affine function of the gray level within an image
    for i in range(5):
        g = gray[i].reshape(-1)
        for ch in range(3):
            fit = np.polyfit(g, x[i, ch].numpy().reshape(-1), 1)
            assert np.abs(np.polyval(fit, g) - x[i, ch].numpy().reshape(-1)).max() <= 1.0
    # colour carries no class: the per-class mean colours are all near the overall mean
    overall = per_image.mean(0)
    for label in range(10):
        assert (per_image[y == label].mean(0) - overall).abs().max() < 55  # ~4 sd of 32 images
