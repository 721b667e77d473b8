"""Turn a data set into FFCV .beton files: one per split, each with an RGB `image` and an int `label`.

    python write_beton.py                                  # Fashion-MNIST, offline (Debian package)
    python write_beton.py --dataset cifar10 --data-dir ~/data/cifar10          # torchvision layout
    python write_beton.py --dataset imagefolder --data-dir /data/imagenet --name imagenet \
        --max-short-side 256 --write-mode proportion --compress-probability 0.5 --jpeg-quality 90

Writes `<out-dir>/<name>_<split>.beton` (train and val; STL-10 also has `unlabeled`, label -1).
Grayscale sources are stored as RGB so that every pipeline sees three channels. Each file is written
under a temporary name and renamed when complete, so a file that exists is a finished one.
"""

import contextlib
import glob
import gzip
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Literal

import cv2
import ffcv.writer
import numpy as np
import tyro
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image

from ffcv_ssl_common import check_settings, folder_problem

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass
class Args:
    dataset: Literal["fashion-mnist", "fashion-mnist-colour", "cifar10", "cifar100", "stl10",
                     "imagefolder"] = "fashion-mnist"
    """Source data set. fashion-mnist-colour: Fashion-MNIST with a random foreground colour and a
    random background colour per image (seeded by --seed and the image's index), unrelated to
    its class: a synthetic stand-in for colour photos offline, where two crops of one image share
    its colours, the shortcut colour augmentations exist to remove."""
    data_dir: str | None = None
    """fashion-mnist: folder with the four idx files (default: the Debian package's); cifar/stl10:
    torchvision root, downloaded there if missing and online; imagefolder: a root holding train/ and
    val/, each with one folder per class (ImageNet layout)."""
    out_dir: str = "data"
    """Where to write the .beton files."""
    name: str | None = None
    """File name prefix (default: the data set's name)."""
    max_resolution: int | None = None
    """Downscale images whose longer side exceeds this (None keeps the original size)."""
    max_short_side: int | None = None
    """Downscale images whose shorter side exceeds this, keeping the aspect ratio (None: keep):
    ImageNet's usual 256 keeps every image at least as large as 224 px views, where
    --max-resolution 256 would leave the short side of a 4:3 photo at 192."""
    write_mode: Literal["raw", "jpg", "proportion", "smart"] = "raw"
    """raw: uint8 pixels (fastest to read); jpg: JPEG (smallest); proportion: JPEG for a random
    share of the images (compress_probability); smart: JPEG when raw would exceed smart_threshold."""
    jpeg_quality: int = 90
    """JPEG quality, 1-100."""
    compress_probability: float = 0.5
    """Share of images stored as JPEG in 'proportion' mode."""
    smart_threshold: int = 256 * 256 * 3
    """In 'smart' mode, images whose raw pixels take more bytes than this are stored as JPEG."""
    num_workers: int = 2
    """Writer processes."""
    subset: int = 0
    """Keep this many images per split, drawn at random with `seed` (0 keeps all)."""
    seed: int = 0
    """Seed for the subset draw."""
    overwrite: bool = False
    """Replace existing .beton files instead of stopping."""


# ---- Sources: each returns {split: indexable of (HxWx3 uint8 array or PIL RGB image, int label)} ----
def _read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype != 0x08:
                raise ValueError("not a uint8 idx file")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), np.uint8)
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as err:
        raise SystemExit(f"error: cannot read idx file {path}: {err}") from err


class ArrayDataset:
    """Images as a (N, H, W) gray or (N, H, W, 3) uint8 array; gray is repeated to RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise SystemExit(f"error: {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image), int(self.labels[i])


def fashion_mnist(data_dir: str | None) -> dict:
    root = data_dir or DEBIAN_FASHION_MNIST
    splits = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        paths = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            found = [p for p in (f"{root}/{prefix}-{kind}.gz", f"{root}/{prefix}-{kind}")
                     if os.path.isfile(p)]
            if not found:
                if data_dir is None:
                    raise SystemExit(f"error: {root}/{prefix}-{kind}.gz not found; install Debian's "
                                     f"dataset-fashion-mnist (make install) or pass --data-dir")
                raise SystemExit(f"error: {root}/{prefix}-{kind}[.gz] not found (--data-dir should "
                                 f"hold the four Fashion-MNIST idx files)")
            paths.append(found[0])
        splits[split] = ArrayDataset(_read_idx(paths[0]), _read_idx(paths[1]))
    return splits


class Colourised:
    """A gray image g (0-255) as background + (foreground - background) x g / 255, both colours
    drawn uniformly in RGB from a generator seeded by (seed, index): the same file every time."""

    def __init__(self, dataset: ArrayDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        fg, bg = np.random.default_rng([self.seed, i]).integers(0, 256, (2, 3))
        alpha = image[:, :, :1].astype(np.float32) / 255  # the gray level, one channel
        out = bg + (fg - bg) * alpha
        return np.ascontiguousarray(np.round(out).astype(np.uint8)), label


class RGBDataset:
    """A torchvision data set whose PIL images are converted to RGB."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image.convert("RGB"), int(label)


def torchvision_source(dataset: str, data_dir: str | None) -> dict:
    import torchvision.datasets as tvd

    root = data_dir or os.path.join("data", "raw", dataset)

    def load(cls, **kwargs):
        try:
            return RGBDataset(cls(root, download=True, **kwargs))
        except Exception as err:  # no network, checksum mismatch, partial download...
            raise SystemExit(f"error: cannot load {dataset} from {root} ({type(err).__name__}: "
                             f"{err}); put torchvision's files there or run where downloads "
                             f"work") from err

    if dataset == "cifar10":
        return {"train": load(tvd.CIFAR10, train=True), "val": load(tvd.CIFAR10, train=False)}
    if dataset == "cifar100":
        return {"train": load(tvd.CIFAR100, train=True), "val": load(tvd.CIFAR100, train=False)}
    return {"train": load(tvd.STL10, split="train"), "unlabeled": load(tvd.STL10, split="unlabeled"),
            "val": load(tvd.STL10, split="test")}


def _path_only(path):
    return path


class ImageFolderDataset:
    """train/<class>/<image> trees. An unreadable image is recorded in `error_log` (one line per
    file, appended, so worker processes can share it) and replaced by a black pixel: ffcv's writer
    waits forever for a worker that died, so we must not raise inside one."""

    def __init__(self, root: str, error_log: str, classes: list[str] | None = None):
        from torchvision.datasets import ImageFolder

        if not os.path.isdir(root):
            raise SystemExit(f"error: image folder {root} does not exist (expected --data-dir to "
                             f"hold train/ and val/, one sub-folder per class)")
        try:
            self.folder = ImageFolder(root, loader=_path_only)  # we decode in __getitem__
        except (FileNotFoundError, RuntimeError) as err:
            raise SystemExit(f"error: no images in {root} ({err})") from err
        self.error_log = error_log
        self.classes = self.folder.classes
        if classes is not None:  # val/: the training split's labels, whatever val/ lacks
            unknown = sorted(set(self.classes) - set(classes))
            if unknown:
                raise SystemExit(f"error: {root} has class folder(s) {', '.join(unknown[:5])} that "
                                 f"the training split lacks; remove them or add them to train/")
            index = {name: k for k, name in enumerate(classes)}
            self.folder.samples = [(path, index[self.classes[label]])
                                   for path, label in self.folder.samples]
            self.classes = classes

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        try:
            with Image.open(path) as image:
                return rgb8(image), label  # decodes all of it: a truncation shows here
        except Exception as err:  # noqa: BLE001 - reported by the parent process
            with open(self.error_log, "a") as log:
                log.write(f"{path}: {type(err).__name__}: {err}\n".replace("\n", " ") + "\n")
            return np.zeros((1, 1, 3), np.uint8), label


def rgb8(image: Image.Image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8. 16-bit grayscale (PNG "I;16", or "I" holding values above
    255) is scaled to 8 bits: PIL's convert("RGB") clips it, storing white for nearly every
    pixel. Other modes (palette, CMYK, alpha, ...) go through convert("RGB")."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.int64)
        if image.mode.startswith("I;16") or values.max() > 255:
            if values.min() < 0 or values.max() > 65535:
                raise ValueError(f"{image.mode} pixels outside 0..65535")
            values = (values * 255 + 32767) // 65535
        gray = values.astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        raise ValueError("floating-point pixels (mode F): convert them to 8 bits first")
    return np.asarray(image.convert("RGB"))


class Prepared:
    """What ffcv's writer processes read: each image as (H, W, 3) uint8, already within
    --max-resolution (ffcv's own resize, with its rounding, but at least 1 pixel a side: a 2000 x
    20 image at 64 px would get a side of 0 and kill a writer process). In a writer process, its
    error output goes to a file the parent reads: a process that dies is reported in one line."""

    def __init__(self, dataset, max_resolution: int | None, error_log: str,
                 max_short_side: int | None = None):
        self.dataset, self.max_resolution, self.error_log = dataset, max_resolution, error_log
        self.max_short_side = max_short_side
        self.parent, self.redirected = os.getpid(), False

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if os.getpid() != self.parent and not self.redirected:
            sys.stderr = open(f"{self.error_log}.{os.getpid()}", "a", buffering=1)
            self.redirected = True
        image, label = self.dataset[i]
        image = rgb8(image) if isinstance(image, Image.Image) else np.asarray(image)
        ratio = 1.0
        if self.max_short_side and min(image.shape[:2]) > self.max_short_side:
            ratio = self.max_short_side / min(image.shape[:2])
        if self.max_resolution and max(image.shape[:2]) * ratio > self.max_resolution:
            ratio = self.max_resolution / max(image.shape[:2])
        if ratio < 1:
            size = np.maximum((ratio * np.array([image.shape[1], image.shape[0]])).astype(int), 1)
            image = cv2.resize(image, tuple(int(v) for v in size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image), label


def imagefolder(data_dir: str | None, error_log: str) -> dict:
    if data_dir is None:
        raise SystemExit("error: --dataset imagefolder needs --data-dir (a root with train/ and val/)")
    train = ImageFolderDataset(os.path.join(data_dir, "train"), error_log)
    # val/ takes train/'s class indices: numbered on its own, a class missing from val/ would
    # shift every later label.
    return {"train": train,
            "val": ImageFolderDataset(os.path.join(data_dir, "val"), error_log, train.classes)}


# ---- Writing ----
class _WriterProcess(multiprocessing.Process):
    """ffcv's writer processes, each recorded when started: the watchdog asks them how they
    ended (a process that ended is no longer an active child, but its exit code stays). One that
    fails prints its traceback and exits at once, skipping Python's exit handlers (a forked child
    can hang in them, and then never has an exit code to report)."""

    started: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.work_queue = kw["args"][0]  # ffcv's queue of chunks to write, shared by all

    def start(self):
        _WriterProcess.started.append(self)
        super().start()

    def run(self):
        try:
            super().run()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


if not hasattr(ffcv.writer.Process, "started"):  # (once, even if this file runs twice)
    ffcv.writer.Process = _WriterProcess  # the name ffcv's writer starts its processes with


class WriterDied(Exception):
    """A writer process exited with an error (raised in the main thread by the watchdog)."""


class Watchdog(threading.Thread):
    """ffcv's writer waits, forever, for its processes to report every image: one that dies (a
    full disk, an image its encoder refuses) hung the writer. This thread watches them and, when
    one exits with an error, sends SIGUSR2 to the main thread, whose handler (installed for the
    write only) raises WriterDied there. A real signal, not `_thread.interrupt_main()`: that one
    does nothing where SIGINT is ignored (a job that a script starts with `&`: the write hung),
    and only a real signal interrupts a blocking read (ffcv waits on a queue for each child's
    last report)."""

    def __init__(self):
        super().__init__(daemon=True)
        if threading.current_thread() is not threading.main_thread():
            raise SystemExit("error: write_beton.main must run in the main thread (its watchdog "
                             "stops a failed write with a signal)")
        self.started = ffcv.writer.Process.started
        self.started.clear()
        self.failed, self.done, self.armed, self.received = 0, False, True, False
        self.lock, self.main = threading.Lock(), threading.get_ident()
        self.previous = signal.signal(signal.SIGUSR2, self.raise_in_main)
        self.start()

    def raise_in_main(self, signum, frame):
        self.received = True
        if self.armed:
            raise WriterDied

    def run(self):
        while True:
            with self.lock:  # (stop() cannot restore the old handler while a signal is sent)
                failed = [p.exitcode for p in list(self.started) if p.exitcode not in (None, 0)]
                if self.done or failed:
                    if failed and not self.done:
                        self.failed = failed[0]
                        signal.pthread_kill(self.main, signal.SIGUSR2)
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        """In the main thread, when the write ends either way: no WriterDied from here on."""
        self.armed = False
        with self.lock:
            self.done = True
        while self.failed and not self.received:  # a signal on its way lands here, harmlessly
            time.sleep(0.01)
        signal.signal(signal.SIGUSR2, self.previous)

    def stop_writers(self, writer) -> None:
        self.stop()
        for child in self.started:
            child.work_queue.cancel_join_thread()  # or exit waits to send the chunks left
            if child.exitcode is None:
                child.terminate()
                child.join(5)
            if child.exitcode is None:
                child.kill()
                child.join(5)
        with contextlib.suppress(Exception):
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()


def last_error(error_log: str, folder: str) -> str:
    """The last line of what the writer processes printed (their traceback's), plus a hint."""
    lines = []
    for log in sorted(glob.glob(glob.escape(error_log) + ".*")):
        lines += [line.strip() for line in open(log, errors="replace") if line.strip()]
    last = lines[-1] if lines else "no message"
    if "No space left" in last or shutil.disk_usage(folder).free < 2**20:
        last += f"; free some space in {folder}"
    return last
def write_split(dataset, path: str, args: Args, error_log: str) -> None:
    indices = np.arange(len(dataset))
    if args.subset:
        indices = np.sort(np.random.default_rng(args.seed).permutation(len(dataset))[: args.subset])
    if len(indices) == 0:
        raise SystemExit(f"error: no images for {path}")
    fields = {
        "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                               smart_threshold=args.smart_threshold,
                               jpeg_quality=args.jpeg_quality,
                               compress_probability=args.compress_probability),
        "label": IntField(),
    }
    # Same folder, so the final rename is atomic; a crash leaves only a *.tmp file behind.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    start = time.time()
    writer = DatasetWriter(tmp, fields, num_workers=args.num_workers)
    watchdog = Watchdog()
    try:
        try:
            writer.from_indexed_dataset(Prepared(dataset, args.max_resolution, error_log,
                                                 args.max_short_side),
                                        indices=indices.tolist(), chunksize=100)
        except (WriterDied, KeyboardInterrupt) as stopped:
            watchdog.stop_writers(writer)
            if isinstance(stopped, KeyboardInterrupt):
                raise  # Ctrl-C: main() prints the usual message
            raise SystemExit(f"error: a writer process failed while writing {path} (exit status "
                             f"{watchdog.failed}: {last_error(error_log, os.path.dirname(tmp))}); "
                             f"nothing was written") from None
        finally:
            watchdog.stop()
        if os.path.exists(error_log) and os.path.getsize(error_log):
            with open(error_log) as log:
                bad = log.read().splitlines()
            raise SystemExit(f"error: {len(bad)} unreadable image(s), first: {bad[0]}; remove or "
                             f"replace them and run again (nothing was written to {path})")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for log in glob.glob(glob.escape(error_log) + ".*"):
            os.remove(log)
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path}: {len(indices)} images, {size:.1f} MiB, {time.time() - start:.1f} s")


def validate(args: Args) -> None:
    """One line naming the flag and what it takes, before anything is read or written."""
    rules = [  # (flag, value, allowed?, what is allowed): ffcv_ssl_common.check_settings
        ("--jpeg-quality", args.jpeg_quality, 1 <= args.jpeg_quality <= 100, "in 1..100"),
        ("--compress-probability", args.compress_probability,
         0.0 <= args.compress_probability <= 1.0, "a probability in [0, 1]"),
        ("--max-resolution", args.max_resolution,
         args.max_resolution is None or args.max_resolution >= 8, ">= 8 pixels"),
        ("--max-short-side", args.max_short_side,
         args.max_short_side is None or args.max_short_side >= 8, ">= 8 pixels"),
        ("--smart-threshold", args.smart_threshold, args.smart_threshold >= 0, ">= 0 bytes"),
        ("--num-workers", args.num_workers, args.num_workers >= 1, "an integer >= 1"),
        ("--subset", args.subset, args.subset >= 0, ">= 0 (0 keeps all)"),
        ("--seed", args.seed, 0 <= args.seed < 2**32, "an integer in [0, 2^32)"),
        ("--name", args.name, args.name is None or (args.name.strip() != "" and "/" not in
                                                      args.name), "a file name prefix without /"),
        ("--out-dir", args.out_dir, args.out_dir.strip() != "", "a folder"),
    ]
    problem = args.out_dir.strip() and folder_problem(args.out_dir)
    rules.append(("--out-dir", args.out_dir, not problem, f"a folder you can write ({problem})"))
    try:
        check_settings(rules)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(args: Args) -> list[str]:
    validate(args)
    name = args.name or args.dataset
    os.makedirs(args.out_dir, exist_ok=True)
    error_log = os.path.join(args.out_dir, f".{name}.errors.{os.getpid()}")
    if args.dataset.startswith("fashion-mnist"):
        splits = fashion_mnist(args.data_dir)
        if args.dataset == "fashion-mnist-colour":
            splits = {split: Colourised(data, args.seed + 7919 * k)
                      for k, (split, data) in enumerate(splits.items())}
    elif args.dataset == "imagefolder":
        splits = imagefolder(args.data_dir, error_log)
    else:
        splits = torchvision_source(args.dataset, args.data_dir)
    paths = {split: os.path.join(args.out_dir, f"{name}_{split}.beton") for split in splits}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {existing[0]} exists; pass --overwrite to replace it")
    try:
        for split, dataset in splits.items():
            write_split(dataset, paths[split], args, error_log)
    finally:
        if os.path.exists(error_log):
            os.remove(error_log)
    return list(paths.values())


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except KeyboardInterrupt:
        sys.exit("interrupted: no partial .beton was left behind")
