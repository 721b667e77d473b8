"""Small data made by the tests themselves: idx files in Fashion-MNIST's format whose pixels encode
the label, real photos from scikit-image, and image folders of real JPEGs."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# The start of a test script run in a new process (argv[1]: the project root): it records which
# functions numba compiles; the script ends with print(ours_compiled()).
COUNT_COMPILES = """
import sys
from numba.core import event
sys.path.insert(0, sys.argv[1])
compiled = []


class Listener(event.Listener):
    def on_start(self, e):
        compiled.append(e.data["dispatcher"].py_func.__module__)

    def on_end(self, e):
        pass


def ours_compiled():
    return sum(m == "ffcv_ssl_common" for m in compiled)


event.register("numba:compile", Listener())
"""

def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, np.uint8).tobytes())


def label_images(n, side=28, seed=0):
    """Gray images whose mean level encodes the label: label k has pixels near 20 + 22 k, plus a
    bright square at a random place so crops differ visibly."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = np.empty((n, side, side), np.uint8)
    for i, label in enumerate(labels):
        img = np.full((side, side), 20 + 22 * label, np.int32) + rng.integers(-3, 4, (side, side))
        y, x = rng.integers(0, side - 6, 2)
        img[y:y + 6, x:x + 6] = 255
        images[i] = np.clip(img, 0, 255)
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """Fashion-MNIST's four idx files, 320 train and 100 val images."""
    d = tmp_path_factory.mktemp("idx")
    for prefix, n, seed in (("train", 320, 0), ("t10k", 100, 1)):
        images, labels = label_images(n, seed=seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


@pytest.fixture(scope="session")
def betons(idx_dir, tmp_path_factory):
    """The idx files above written by write_beton.py: {'train': path, 'val': path}."""
    import write_beton

    out = tmp_path_factory.mktemp("beton")
    write_beton.main(write_beton.Args(data_dir=str(idx_dir), out_dir=str(out), name="tiny",
                                      num_workers=1))
    return {"train": str(out / "tiny_train.beton"), "val": str(out / "tiny_val.beton")}


def photos(side=None):
    """Real RGB photos bundled with scikit-image (no download)."""
    from skimage import data
    from PIL import Image

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    if side:
        images = [np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR))
                  for im in images]
    return images


def make_image_folder(root, per_class=6, corrupt=None, seed=0):
    """root/{train,val}/{class}/*.jpg: random crops of real photos saved as JPEG, one class per
    photo; `corrupt` names a split whose first class gets one truncated JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, photo in enumerate(photos()):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = rng.integers(60, 200, 2)
                y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
                Image.fromarray(photo[y:y + h, x:x + w]).save(folder / f"{k}.jpg", quality=90)
        if corrupt == split:
            good = (root / split / "class0" / "0.jpg").read_bytes()
            (root / split / "class0" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(scope="session")
def unlabelled_beton(tmp_path_factory):
    """192 images with label -1 (as STL-10's unlabeled split), written with ffcv directly."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images, _ = label_images(192, seed=2)
    data = [(np.repeat(im[:, :, None], 3, axis=2), -1) for im in images]
    path = str(tmp_path_factory.mktemp("unlabelled") / "unlabelled.beton")
    DatasetWriter(path, {"image": RGBImageField(), "label": IntField()},
                  num_workers=1).from_indexed_dataset(data)
    return path


# ---- method scripts end to end ----
# Each method file on the tiny data: 320 images / batch 64 = 5 steps per epoch, 16 px views.
TINY = ["--epochs", "2", "--batch-size", "64", "--projector-dims", "64", "32",
        "--warmup-epochs", "0.5", "--num-workers", "1", "--device", "cpu"]
VIEWS_16 = ["--view1.resolution", "16", "--view2.resolution", "16"]
METHODS = {"simclr.py": VIEWS_16, "barlowtwins.py": VIEWS_16, "vicreg.py": VIEWS_16,
           "instance_simclr.py": ["--resolution", "16", "--num-negatives", "2"]}


def method_args(script, betons, out_dir, *args, tiny=True):
    """A method file's arguments for the test data: the TINY budget unless `tiny` is False."""
    budget = [*TINY, *METHODS[script]] if tiny else []
    train = betons["train"] if isinstance(betons["train"], list) else [betons["train"]]
    return ["--train-beton", *train, "--val-beton", betons["val"], "--out-dir", str(out_dir),
            *budget, *args]


def run_method(script, betons, out_dir, *args, torchrun=False, check=True, tiny=True):
    """`python <script>` (or torchrun with 2 CPU processes) on the test .beton files, with the
    TINY budget unless `tiny` is False; with `check`, a non-zero exit or anything alarming on
    stderr (a traceback, numba's "Exception ignored") fails the test."""
    import subprocess

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"] if torchrun else [sys.executable]
    cmd = [*launcher, script, *method_args(script, betons, out_dir, *args, tiny=tiny)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for alarm in ("Traceback", "Exception ignored"):
            assert alarm not in done.stderr, done.stderr[-3000:]
    return done


def run_in_process(script, *args):
    """`python <script> <args>` in this process (runpy, as __main__): (exit status, stdout,
    stderr). For what a command line answers before anything slow (bad input: one line, a
    non-zero exit), without the ~5 s a new interpreter takes to import torch and ffcv."""
    import contextlib
    import io
    import runpy

    out, err, status = io.StringIO(), io.StringIO(), 0
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if isinstance(code, str):  # sys.exit("error: ..."): printed to stderr, status 1
            err.write(code + "\n")
            status = 1
        else:
            status = code or 0
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def straight(betons, tmp_path_factory):
    """straight(script): the out_dir of that method file's TINY run in one go (two epochs), made
    once per test session and shared by every test that compares against it."""
    runs = {}

    def get(script):
        if script not in runs:
            out = tmp_path_factory.mktemp("straight_" + script[:-3])
            run_method(script, betons, out)
            runs[script] = out
        return runs[script]

    return get


def args_from_settings(module, saved: dict):
    """module.Args from saved settings (a checkpoint's "args", args.json): lists back to tuples,
    the views' dicts back to ViewConfig."""
    import ffcv_ssl_common as C

    def value(v):
        if isinstance(v, dict):
            return C.ViewConfig(**{f: value(x) for f, x in v.items()})
        return tuple(v) if isinstance(v, list) else v

    return C.with_settings(module.Args(), **{k: value(v) for k, v in saved.items()})


def load_exported_resnet18(path):
    """A method's backbone.pt into torchvision's resnet18 with fc = Identity() and the stem that
    backbone.json beside it describes, strictly: what a user of the export does."""
    import json

    import torch
    import torch.nn as nn
    import torchvision

    stem = json.load(open(os.path.join(os.path.dirname(path), "backbone.json")))["stem"]
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, bias=False, **stem["conv1"])
    if not stem["maxpool"]:
        net.maxpool = nn.Identity()
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return net


def same_weights(path_a, path_b):
    """Whether two state dicts (backbone.pt files) are bit-identical."""
    import torch

    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the DDP path of a loss, with CPU processes ----
def _loss(name, z1, z2):
    if name == "nt_xent":
        from simclr import nt_xent_loss
        return nt_xent_loss(z1, z2, 0.2)
    if name == "instance":  # with in-batch negatives: the only case that gathers
        from instance_simclr import instance_nt_xent_loss
        z_neg = (z1.flip(1) - z2).unsqueeze(1)  # a negative per image, computed row by row
        return instance_nt_xent_loss(z1, z2, z_neg, 0.2, in_batch=True)
    if name == "barlow":
        from barlowtwins import barlow_twins_loss
        return barlow_twins_loss(z1, z2, 0.0051)
    from vicreg import vicreg_loss
    return vicreg_loss(z1, z2)[0]


def _ddp_worker(rank, world, port, name, z1, z2, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = z1.shape[0] // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = _loss(name, a, b)
    loss.backward()
    out[rank] = (loss.detach(), a.grad, b.grad)
    dist.destroy_process_group()


def run_ddp(name, z1, z2, world=2):
    """Loss `name` ("nt_xent", "instance", "barlow", "vicreg") in `world` gloo processes, each holding its
    share of the batch; returns [(loss, grad of its z1 share, grad of its z2 share)] per rank,
    and the single-process (loss, grad z1, grad z2) on the whole batch."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(world, port, name, z1, z2, out), nprocs=world, join=True)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = _loss(name, a, b)
    full.backward()
    return [out[r] for r in range(world)], (full.detach(), a.grad, b.grad)
