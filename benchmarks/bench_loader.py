"""Images per second of the two-view SimCLR augmentation pipeline: our FFCV loader against a
torchvision DataLoader doing the same augmentations on the same JPEGs, in one run.

    python benchmarks/bench_loader.py                      # ~10 min on 2 cores
    python benchmarks/bench_loader.py --num-images 2000    # quick look

Data: `num_images` realistic JPEGs (random crops of scikit-image's bundled photos, quality 90),
once at 64 px (views 64 px) and once at 192 px (views 160 px). torchvision reads them from an
image folder with PIL; ffcv from a .beton holding the same images as JPEG (write_mode jpg).
Both sides: batch size, worker count (threads for ffcv, processes for torchvision), crop scale,
flip, jitter 0.4/0.4/0.4/0.1 at p=0.8, grayscale 0.2, normalisation, float32 NCHW output.
Reported: images/s (one image = its two views) over a full epoch after a warm-up epoch, the
per-augmentation cost on the ffcv side (one view, crop alone vs crop + that op at p=1), and the
first-batch (compile) time of a new process with numba's cache cold and warm.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ffcv_ssl_common as C  # noqa: E402
import write_beton  # noqa: E402


@dataclass
class Args:
    num_images: int = 10_000
    """JPEGs per resolution."""
    batch_size: int = 256
    num_workers: int = 2
    """ffcv threads / torchvision worker processes."""
    work_dir: str = "bench_data"
    """Where the JPEG folders and .beton files go (reused when present)."""
    resolutions: tuple[int, ...] = (64, 160)
    """Output side of the views; the stored images are 64 px and 192 px respectively."""
    skip_compile: bool = False
    """Skip the cold/warm compile measurement (two extra processes)."""
    out: str = "bench_data/results.json"


def make_jpegs(root: str, n: int, side: int, seed: int = 0) -> None:
    """root/train/class{k}/{i}.jpg, one class per source photo, and an (empty-ish) val split."""
    from PIL import Image
    from skimage import data

    if os.path.isdir(root):
        return
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    tmp = root + ".partial"
    for split, count in (("train", n), ("val", len(photos))):
        for k in range(count):
            c = k % len(photos)
            photo = photos[c]
            s = int(rng.integers(min(photo.shape[:2]) // 4, min(photo.shape[:2])))
            y, x = rng.integers(0, photo.shape[0] - s + 1), rng.integers(0, photo.shape[1] - s + 1)
            folder = os.path.join(tmp, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            crop = Image.fromarray(photo[y:y + s, x:x + s]).resize((side, side), Image.BILINEAR)
            crop.save(os.path.join(folder, f"{k}.jpg"), quality=90)
    os.replace(tmp, root)


class TwoViews:
    def __init__(self, view):
        self.view = view

    def __call__(self, img):
        return self.view(img), self.view(img)


def torchvision_loader(root: str, resolution: int, args: Args):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    view = T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    dataset = ImageFolder(os.path.join(root, "train"), transform=TwoViews(view))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.num_workers, drop_last=True,
                                       persistent_workers=True)


def epoch_rate(loader, warmup_epochs: int = 1) -> float:
    for _ in range(warmup_epochs):
        for _ in loader:
            pass
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += len(batch[-1])
    return n / (time.perf_counter() - start)


def first_batch_seconds(beton: str, resolution: int, cache_dir: str, args: Args) -> float:
    """A new process: import, build the two-view loader, wait for its first batch."""
    code = ("import sys, time; sys.path.insert(0, '.'); t = time.perf_counter(); "
            "import ffcv_ssl_common as C; "
            f"L = C.make_ssl_loader({beton!r}, C.simclr_views({resolution}), "
            f"batch_size={args.batch_size}, num_workers={args.num_workers}); next(iter(L)); "
            "print(time.perf_counter() - t)")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> None:
    torch.set_num_threads(args.num_workers)
    results: dict = {"hardware": f"{os.cpu_count()} CPU cores", "num_images": args.num_images,
                     "batch_size": args.batch_size, "num_workers": args.num_workers}
    for resolution in args.resolutions:
        side = 64 if resolution <= 64 else 192
        root = os.path.join(args.work_dir, f"jpeg{side}_{args.num_images}")
        t = time.perf_counter()
        make_jpegs(root, args.num_images, side)
        name = f"jpeg{side}_{args.num_images}"
        beton = os.path.join(args.work_dir, f"{name}_train.beton")
        if not os.path.exists(beton):
            write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=root,
                                              out_dir=args.work_dir, name=name, write_mode="jpg",
                                              jpeg_quality=90, num_workers=args.num_workers))
        print(f"[{resolution}px] data ready in {time.perf_counter() - t:.0f} s")

        ours = C.make_ssl_loader(beton, C.simclr_views(resolution), batch_size=args.batch_size,
                                 num_workers=args.num_workers)
        ffcv_rate = epoch_rate(ours)
        tv_rate = epoch_rate(torchvision_loader(root, resolution, args))
        row = {"ffcv_img_per_s": ffcv_rate, "torchvision_img_per_s": tv_rate,
               "speedup": ffcv_rate / tv_rate}
        print(f"[{resolution}px] two views: ffcv {ffcv_rate:.0f} img/s, torchvision "
              f"{tv_rate:.0f} img/s: {ffcv_rate / tv_rate:.2f}x")

        # Each augmentation alone (one view, p=1) against the crop alone.
        base = C.ViewConfig(resolution=resolution, flip_p=0, jitter_p=0, grayscale_p=0)
        variants = {
            "crop only": base,
            "flip": replace(base, flip_p=1.0),
            "color jitter": replace(base, jitter_p=1.0, saturation=0.4),
            "grayscale": replace(base, grayscale_p=1.0),
            "gaussian blur": replace(base, blur_p=1.0),
            "solarization": replace(base, solarize_p=1.0),
            "gaussian noise": replace(base, noise_p=1.0, noise_std=0.1),
        }
        costs = {}
        for label, view in variants.items():
            loader = C.make_ssl_loader(beton, [view], batch_size=args.batch_size,
                                       num_workers=args.num_workers)
            rate = epoch_rate(loader)
            costs[label] = rate
            print(f"[{resolution}px] one view, {label:>14}: {rate:.0f} img/s "
                  f"({1e6 / rate - 1e6 / costs['crop only']:+.0f} us/img vs crop only)")
        row["one_view_img_per_s"] = costs

        if not args.skip_compile:
            with tempfile.TemporaryDirectory() as cache:
                cold = first_batch_seconds(beton, resolution, cache, args)
                warm = first_batch_seconds(beton, resolution, cache, args)
            row["first_batch_s"] = {"cold_cache": cold, "warm_cache": warm}
            print(f"[{resolution}px] first batch of a new process: {cold:.1f} s with numba's "
                  f"cache cold, {warm:.1f} s warm")
        results[f"{resolution}px"] = row

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
