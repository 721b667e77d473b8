"""Images per second of the two-view SSL loader against a torchvision DataLoader doing the same
augmentations on the same photos, in one run; prints the README's loader table.

    python benchmarks/bench_loader.py                       # ~10 min on 2 cores
    python benchmarks/bench_loader.py --num-images 1000 --resolutions 64 224   # a quick look

Data: `num_images` ImageNet-like JPEGs (random crops of scikit-image's bundled photos, resized to a
short side of 300-500 px, quality 90), as an image folder for torchvision (PIL decodes them) and
as a .beton with the images stored as JPEG for ffcv. Recipes, both sides, views at each resolution:
- SimCLR (ImageNet): crop 0.08-1, flip, colour jitter 0.4/0.4/0.4/0.1 at p=0.8, grayscale 0.2,
  Gaussian blur p=0.5 (kernel ~10% of the view, sigma 0.1-2), both views;
- BYOL: jitter 0.4/0.4/0.2/0.1 at p=0.8, grayscale 0.2, blur 1.0 / 0.1, solarisation 0 / 0.2;
then normalisation and float32 NCHW. Same batch size; ffcv runs `num_workers` threads,
torchvision `num_workers` processes. One image = its two views; the rate is over a whole epoch
after a few warm-up batches. Rows:
- ours: make_ssl_loader as the method files use it (each image decoded once for both views,
  JPEGs decoded at a reduced scale when the crops allow: jpeg_decode_plan);
- ours, decoding as ffcv does: every pixel, once per view (partial_decode=False,
  decode_once=False): what the two speed-ups add;
- ceiling: our decode + crop of the two views with no augmentation at all (an upper bound for
  this loader); the full pipeline's share of it is printed;
- torchvision, and ours / torchvision.
Also the first batch of a new process with numba's cache warm (the method files' start-up).
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ffcv_ssl_common as C  # noqa: E402
import write_beton  # noqa: E402


@dataclass
class Args:
    num_images: int = 3000
    """Training JPEGs (short side 300-500 px)."""
    batch_size: int = 128
    num_workers: int = 2
    """ffcv threads / torchvision worker processes."""
    resolutions: tuple[int, ...] = (64, 112, 160, 224)
    """View sides to measure."""
    recipes: tuple[str, ...] = ("simclr", "byol")
    warmup_batches: int = 4
    work_dir: str = "bench_data"
    """Where the JPEG folder and the .beton go (reused when present)."""
    out: str = "bench_data/loader_results.json"
    """The numbers as JSON; the table goes beside it as .md."""


def cpu_name() -> str:
    """The CPU's model name and the vector extensions that change the speed here."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {', '.join(ext) or 'no AVX2'})"


def make_jpegs(root: str, n: int, seed: int = 0) -> None:
    """root/train/class{k}/{i}.jpg (one class per source photo) and a small root/val."""
    from PIL import Image
    from skimage import data

    if os.path.isdir(root):
        return
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              data.hubble_deep_field(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    tmp = root + ".partial"
    for split, count in (("train", n), ("val", 2 * len(photos))):
        for k in range(count):
            c = k % len(photos)
            photo = photos[c]
            H, W = photo.shape[:2]
            ch = int(rng.integers(min(H, W) // 2, min(H, W) + 1))
            cw = min(W, int(ch * rng.uniform(1.0, 1.5)))
            y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
            short = int(rng.integers(300, 501))
            f = short / min(ch, cw)
            crop = Image.fromarray(photo[y:y + ch, x:x + cw])
            crop = crop.resize((round(cw * f), round(ch * f)), Image.BILINEAR)
            folder = os.path.join(tmp, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            crop.save(os.path.join(folder, f"{k}.jpg"), quality=90)
    os.replace(tmp, root)


def recipe_views(recipe: str, resolution: int) -> tuple[C.ViewConfig, C.ViewConfig]:
    if recipe == "simclr":  # SimCLR's ImageNet recipe: simclr_views plus blur p=0.5
        v = replace(C.simclr_views(resolution)[0], blur_p=0.5)
        return v, replace(v)
    if recipe == "byol":
        return C.byol_views(resolution)
    raise SystemExit(f"error: unknown recipe {recipe!r}; use simclr or byol")


def torchvision_view(view: C.ViewConfig):
    """The same view with torchvision's transforms (PIL in, float32 CHW out)."""
    import torchvision.transforms as T

    ops = [T.RandomResizedCrop(view.resolution, scale=view.crop_scale, ratio=view.crop_ratio,
                               antialias=True),
           T.RandomHorizontalFlip(view.flip_p),
           T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation,
                                        view.hue)], p=view.jitter_p),
           T.RandomGrayscale(view.grayscale_p)]
    if view.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(view.kernel_size(), view.blur_sigma)],
                                 p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(T.RandomSolarize(view.solarize_threshold, p=view.solarize_p))
    ops += [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return T.Compose(ops)


class TwoViews:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, img):
        return self.first(img), self.second(img)


def torchvision_loader(root: str, views, args: Args, pin_memory: bool = False):
    from torchvision.datasets import ImageFolder

    transform = TwoViews(torchvision_view(views[0]), torchvision_view(views[1]))
    dataset = ImageFolder(os.path.join(root, "train"), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.num_workers, drop_last=True,
                                       persistent_workers=True, pin_memory=pin_memory)


def epoch_rate(loader, warmup_batches: int) -> float:
    """Images per second over one epoch, after `warmup_batches` batches of an earlier one (the
    clock starts once the new epoch's iterator exists: its first batches are timed)."""
    for k, _ in enumerate(loader):
        if k + 1 >= warmup_batches:
            break
    # The new epoch's iterator is made before the clock starts: that stops the warm-up epoch
    # (ours: close() ends its thread; torchvision: its workers finish the batches they had
    # prefetched for it), work that belongs to neither epoch.
    epoch = iter(loader)
    n, start = 0, time.perf_counter()
    for batch in epoch:
        n += len(batch[-1])
    return n / (time.perf_counter() - start)


def first_batch_seconds(beton: str, resolution: int, args: Args) -> float:
    """A new process: import, build the two-view loader, wait for its first batch (numba's
    cache is whatever this machine has: warm after this script's own loaders)."""
    code = ("import sys, time; t = time.perf_counter(); sys.path.insert(0, '.'); "
            "import ffcv_ssl_common as C; "
            f"L = C.make_ssl_loader({beton!r}, C.simclr_views({resolution}), "
            f"batch_size={args.batch_size}, num_workers={args.num_workers}); next(iter(L)); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> None:
    if args.num_images < 2 * args.batch_size or min(args.resolutions) < 8:
        raise SystemExit("error: --num-images must hold at least two batches and every "
                         "resolution must be >= 8 px")
    for recipe in args.recipes:
        recipe_views(recipe, 32)  # unknown names fail now, not after minutes of work
    torch.set_num_threads(args.num_workers)
    root = os.path.join(args.work_dir, f"photos_{args.num_images}")
    name = f"photos_{args.num_images}"
    beton = os.path.join(args.work_dir, f"{name}_train.beton")
    t = time.perf_counter()
    make_jpegs(root, args.num_images)
    if not os.path.exists(beton):
        write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=root,
                                          out_dir=args.work_dir, name=name, write_mode="jpg",
                                          jpeg_quality=90, num_workers=args.num_workers))
    print(f"data ready in {time.perf_counter() - t:.0f} s: {beton}", flush=True)
    if len(args.resolutions) > 1:
        # One process per resolution: an ffcv loader's buffers outlive it (a process that builds
        # the 20 loaders of a full run grows past 20 GiB and is killed), and every resolution
        # then starts from the same state.
        rows, first_batch = {}, None
        for resolution in args.resolutions:
            part = f"{os.path.splitext(args.out)[0]}_{resolution}px.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--num-images",
                   str(args.num_images), "--batch-size", str(args.batch_size), "--num-workers",
                   str(args.num_workers), "--resolutions", str(resolution), "--recipes",
                   *args.recipes, "--warmup-batches", str(args.warmup_batches), "--work-dir",
                   args.work_dir, "--out", part]
            subprocess.run(cmd, check=True, cwd=ROOT)
            done = json.load(open(part))
            rows.update(done["rows"])
            first_batch = first_batch or done["first_batch_warm_s"]
        results = {**done, "rows": rows, "first_batch_warm_s": first_batch,
                   "command": "python benchmarks/bench_loader.py " + " ".join(sys.argv[1:])}
        return finish(results, args)
    results: dict = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
                     "command": "python benchmarks/bench_loader.py " + " ".join(sys.argv[1:]),
                     "num_images": args.num_images, "batch_size": args.batch_size,
                     "num_workers": args.num_workers, "rows": {}}

    def ours(views, **kw):
        loader = C.make_ssl_loader(beton, views, batch_size=args.batch_size,
                                   num_workers=args.num_workers, **kw)
        return epoch_rate(loader, args.warmup_batches)

    for resolution in args.resolutions:
        bare = C.ViewConfig(resolution=resolution, flip_p=0, jitter_p=0, grayscale_p=0)
        ceiling = ours([bare, replace(bare)])
        results["rows"][f"ceiling {resolution}"] = ceiling
        print(f"[{resolution} px] ceiling (decode + crop of two views): {ceiling:.0f} img/s",
              flush=True)
        for recipe in args.recipes:
            views = recipe_views(recipe, resolution)
            row = {"ours": ours(views),
                   "ours_full_decode_per_view": ours(views, partial_decode=False,
                                                     decode_once=False),
                   "torchvision": epoch_rate(torchvision_loader(root, views, args),
                                             args.warmup_batches),
                   "ceiling": ceiling}
            row["speedup"] = row["ours"] / row["torchvision"]
            results["rows"][f"{recipe} {resolution}"] = row
            print(f"[{resolution} px] {recipe}: ours {row['ours']:.0f} img/s, decoding as ffcv "
                  f"{row['ours_full_decode_per_view']:.0f}, torchvision {row['torchvision']:.0f}:"
                  f" {row['speedup']:.2f}x; {100 * row['ours'] / ceiling:.0f}% of the ceiling",
                  flush=True)
    results["first_batch_warm_s"] = first_batch_seconds(beton, args.resolutions[0], args)
    print(f"first batch of a new process (numba cache warm): "
          f"{results['first_batch_warm_s']:.1f} s", flush=True)
    finish(results, args)


def finish(results: dict, args: Args) -> None:
    table = markdown(results, args)
    print("\n" + table)
    write_results(args.out, results, table)


def write_results(out: str, results: dict, table: str) -> None:
    """The numbers as JSON at `out` and the table beside it as .md, each complete or absent."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    for path, text in ((out, json.dumps(results, indent=1)),
                       (os.path.splitext(out)[0] + ".md", table)):
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print(f"wrote {out} and its .md")


def markdown(results: dict, args: Args) -> str:
    lines = [f"`{results['command'].strip()}`, {results['date']}, {results['cpu']}; "
             f"{args.num_images} JPEGs (short side 300-500 px, quality 90), batch "
             f"{args.batch_size}, {args.num_workers} workers; images/s, one image = two views",
             "",
             "| views | recipe | ours | decoding as ffcv (all pixels, per view) | torchvision "
             "| **ours / torchvision** | ceiling (decode + crop) | ours / ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for resolution in args.resolutions:
        for recipe in args.recipes:
            r = results["rows"][f"{recipe} {resolution}"]
            lines.append(f"| {resolution} px | {recipe} | {r['ours']:,.0f} | "
                         f"{r['ours_full_decode_per_view']:,.0f} | {r['torchvision']:,.0f} | "
                         f"**{r['speedup']:.2f}x** | {r['ceiling']:,.0f} | "
                         f"{100 * r['ours'] / r['ceiling']:.0f}% |")
    lines.append(f"\nFirst batch of a new process with numba's cache warm: "
                 f"{results['first_batch_warm_s']:.1f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args))
