"""Images per second of whole SimCLR training epochs (loading, augmenting and the model's step) fed
by our loader and by a torchvision DataLoader doing the same augmentations: the paper's headline
claim, an SSL epoch about 3x faster with FFCV (its runs: ResNet-50 on ImageNet, GPUs).

    python benchmarks/bench_epoch.py                      # on a GPU: ResNet-50, 224 px views
    python benchmarks/bench_epoch.py --arch resnet18 --resolution 112

Data: bench_loader.py's ImageNet-like JPEGs (short side 300-500 px, quality 90), as a .beton for
us and an image folder for torchvision. Both sides run the same step: simclr.py's model (both views
in one batch, NT-Xent in fp32), its LARS, autocast at `--precision`, channels_last; torchvision's
batches are pinned and copied without blocking, as its users do. Rows, each one epoch after a
partial warm-up epoch:
- model alone: the same step on one batch kept on the device (the ceiling of any loader);
- ours and torchvision, the loader alone (the batches reach the device, no step);
- ours and torchvision, training: what an SSL epoch costs; the ratio is the paper's claim.
On a 2-core CPU the step dominates and the two trainings run at about the same speed: the
loader's share of an epoch is what this measures, so the answer depends on the machine.
"""

import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_loader  # noqa: E402
import ffcv_ssl_common as C  # noqa: E402
import simclr  # noqa: E402
import write_beton  # noqa: E402


@dataclass
class Args:
    num_images: int = 4096
    """Training JPEGs (short side 300-500 px)."""
    arch: str = "resnet50"
    """Backbone (any torchvision ResNet; the paper's: resnet50)."""
    resolution: int = 224
    """Side of both views."""
    recipe: Literal["simclr", "byol"] = "simclr"
    """Augmentations (bench_loader.py): SimCLR's ImageNet recipe or BYOL's."""
    batch_size: int = 256
    num_workers: int = 0
    """ffcv threads / torchvision worker processes (0: one per CPU core)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """As in simclr.py."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    warmup_batches: int = 4
    work_dir: str = "bench_data"
    """Where the JPEG folder and the .beton go (reused when present)."""
    out: str = "bench_data/epoch_results.json"
    """The numbers as JSON; the table goes beside it as .md."""


def training_step(model, optimizer, scaler, amp_dtype):
    """simclr.py's step (without the learning-rate schedule): one function for every row."""
    def step(x1, x2, y):
        with torch.autocast(x1.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, probe_loss, _ = model(x1, x2, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss + probe_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step


def device_batches(loader, device):
    """(x1, x2, y) on `device`, channels_last: ours are there already; torchvision's
    ((x1, x2), y) are copied from pinned memory without blocking."""
    for batch in loader:
        if len(batch) == 3:
            yield batch
            continue
        (x1, x2), y = batch
        yield (x1.to(device, non_blocking=True, memory_format=torch.channels_last),
               x2.to(device, non_blocking=True, memory_format=torch.channels_last),
               y.to(device, non_blocking=True))


def timed_epoch(loader, device, step, warmup_batches: int) -> float:
    """Images per second over one epoch (`step` on each batch, or nothing), after
    `warmup_batches` batches of an earlier epoch; synchronised with the device at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k, batch in enumerate(device_batches(loader, device)):
        last = step(*batch) if step else batch[-1]
        if k + 1 >= warmup_batches:
            break
    sync()
    epoch = iter(loader)  # stops the warm-up epoch before the clock starts (bench_loader.py)
    n, start = 0, time.perf_counter()
    for batch in device_batches(epoch, device):
        last = step(*batch) if step else batch[-1]
        n += len(batch[-1])
    float(last.float().sum())  # waits for the last step
    sync()
    return n / (time.perf_counter() - start)


def model_alone(step, loader, device, batches: int) -> float:
    """The step on one batch kept on the device: no loading at all."""
    x1, x2, y = (t.clone() for t in next(device_batches(loader, device)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step(x1, x2, y)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        last = step(x1, x2, y)
    float(last)
    sync()
    return batches * len(y) / (time.perf_counter() - start)


def main(args: Args) -> dict:
    workers = args.num_workers or os.cpu_count()
    if args.num_images < 3 * args.batch_size or args.resolution < 8:
        raise SystemExit("error: --num-images must hold at least three batches and "
                         "--resolution must be >= 8 px")
    if args.arch not in C.RESNETS:
        raise SystemExit(f"error: --arch {args.arch!r}: use one of {', '.join(C.RESNETS)}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    amp_dtype = C.autocast_dtype(args.precision, device)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(workers)
    name = f"photos_{args.num_images}"
    root = os.path.join(args.work_dir, name)
    beton = os.path.join(args.work_dir, f"{name}_train.beton")
    t = time.perf_counter()
    bench_loader.make_jpegs(root, args.num_images)
    if not os.path.exists(beton):
        write_beton.main(write_beton.Args(dataset="imagefolder", data_dir=root,
                                          out_dir=args.work_dir, name=name, write_mode="jpg",
                                          jpeg_quality=90, num_workers=workers))
    print(f"data ready in {time.perf_counter() - t:.0f} s: {beton}", flush=True)

    views = bench_loader.recipe_views(args.recipe, args.resolution)
    torch.manual_seed(0)
    config = C.with_settings(simclr.Args(), arch=args.arch, view1=views[0],
                             view2=replace(views[1]), batch_size=args.batch_size, num_classes=6)
    model = simclr.SimCLR(config, C.resolve_stem("auto", args.resolution))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = simclr.make_optimizer(config.optim, model,
                                      config.optim.base_lr * args.batch_size / 256)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = training_step(model, optimizer, scaler, amp_dtype)
    ours = C.make_ssl_loader(beton, views, batch_size=args.batch_size, num_workers=workers,
                             device=device)
    tv = bench_loader.torchvision_loader(root, views, bench_loader.Args(
        batch_size=args.batch_size, num_workers=workers), pin_memory=use_cuda)  # pinned for the GPU

    rows = {"model alone": model_alone(step, ours, device, batches=len(ours))}
    print(f"model alone: {rows['model alone']:.0f} img/s", flush=True)
    for label, loader in (("ours", ours), ("torchvision", tv)):
        rows[f"{label}, loader alone"] = timed_epoch(loader, device, None, args.warmup_batches)
        rows[f"{label}, training"] = timed_epoch(loader, device, step, args.warmup_batches)
        print(f"{label}: loader alone {rows[f'{label}, loader alone']:.0f} img/s, training "
              f"{rows[f'{label}, training']:.0f} img/s", flush=True)
    speedup = rows["ours, training"] / rows["torchvision, training"]
    gpu = torch.cuda.get_device_name(device) if use_cuda else "no GPU"
    results = {"cpu": bench_loader.cpu_name(), "device": gpu, "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__,
               "command": "python benchmarks/bench_epoch.py " + " ".join(sys.argv[1:]),
               "settings": {**vars(args), "num_workers": workers,
                            "precision": C.PRECISION_NAMES[amp_dtype]},
               "rows": rows, "speedup": speedup}
    table = markdown(results)
    print("\n" + table)
    bench_loader.write_results(args.out, results, table)
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"`{results['command'].strip()}`, {results['date']}, {results['device']}, "
             f"{results['cpu']}, torch {results['torch']}; SimCLR {s['arch']}, {s['recipe']} "
             f"views of {s['resolution']} px, batch {s['batch_size']}, {s['precision']}, "
             f"{s['num_workers']} workers, {s['num_images']} JPEGs (short side 300-500 px); "
             f"images/s, one image = two views", "", "| row | images/s |", "|---|---|"]
    lines += [f"| {row} | {value:,.0f} |" for row, value in results["rows"].items()]
    lines.append(f"| **SSL epoch, ours / torchvision** | **{results['speedup']:.2f}x** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
