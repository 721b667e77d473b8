"""Microseconds per view of each augmentation kernel, ours against torchvision's functional with
the same parameters, on one core, on a crop of a real photo; prints a markdown table.

    python benchmarks/bench_kernels.py                    # 64, 112, 224 px; ~1 min
    python benchmarks/bench_kernels.py --resolutions 112 --repeats 500

What the loader table (bench_loader.py) cannot separate: how much each operation costs. Ours run
in place on an (H, W, 3) uint8 array (as inside the loader, one image per call); torchvision's on
a (3, H, W) uint8 tensor, torch limited to one thread. Each time is the median over `repeats`
calls, after one warm-up call (numba's compilation, or loading it from the cache).
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ffcv_ssl_common as C  # noqa: E402
from bench_loader import cpu_name  # noqa: E402


@dataclass
class Args:
    resolutions: tuple[int, ...] = (64, 112, 224)
    repeats: int = 200
    """Calls per kernel; the median is reported."""


def median_us(fn, make_input, repeats: int) -> float:
    fn(make_input())
    times = []
    for _ in range(repeats):
        x = make_input()
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main(args: Args) -> None:
    if args.repeats < 1 or min(args.resolutions) < 8:
        raise SystemExit("error: --repeats must be >= 1 and every resolution >= 8 px")
    from skimage import data

    torch.set_num_threads(1)
    photo = data.coffee()  # 400 x 600, saturated colours (the hue has work on most pixels)
    rows = []
    for side in args.resolutions:
        img = np.zeros((side, side, 3), np.uint8)
        C.resize_crop_antialias(photo, 0, 400, 100, 500, img)
        tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        k = C.ViewConfig(resolution=side).kernel_size()
        kernels = {
            "hue 0.1": (lambda x: C.adjust_hue_(x, 0.1), lambda t: TF.adjust_hue(t, 0.1)),
            "saturation 1.3": (lambda x: C.adjust_saturation_(x, 1.3),
                               lambda t: TF.adjust_saturation(t, 1.3)),
            "contrast 1.3": (lambda x: C.adjust_contrast_(x, 1.3),
                             lambda t: TF.adjust_contrast(t, 1.3)),
            "brightness 1.3": (lambda x: C.adjust_brightness_(x, 1.3),
                               lambda t: TF.adjust_brightness(t, 1.3)),
            "grayscale": (C.to_grayscale_, lambda t: TF.rgb_to_grayscale(t, 3)),
            "flip": (C.hflip_, TF.hflip),
            f"blur k={k} sigma 1": (lambda x: C.gaussian_blur_(x, k, 1.0),
                                    lambda t: TF.gaussian_blur(t, [k, k], [1.0, 1.0])),
            "solarize 128": (lambda x: C.solarize_(x, np.uint8(128)),
                             lambda t: TF.solarize(t, 128)),
        }
        for name, (ours, theirs) in kernels.items():
            a = median_us(ours, img.copy, args.repeats)
            b = median_us(theirs, tensor.clone, args.repeats)
            rows.append((side, name, a, b))
            print(f"[{side} px] {name}: ours {a:.0f} us, torchvision {b:.0f} us", flush=True)
    print(f"\n`python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`".rstrip() +
          f", {time.strftime('%Y-%m-%d')}, {cpu_name()}; one core, microseconds per view "
          f"(median of {args.repeats})\n")
    print("| view | kernel | ours | torchvision | torchvision / ours |\n|---|---|---|---|---|")
    for side, name, a, b in rows:
        print(f"| {side} px | {name} | {a:.0f} | {b:.0f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main(tyro.cli(Args))
