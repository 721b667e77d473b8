"""Offline evaluation of a backbone: linear probe, MLP probe and k-NN on frozen features.

    python probe.py --backbone runs/simclr/backbone.pt              # any method file's export
    python probe.py --backbone runs/simclr/backbone.pt --random-init   # the baseline to beat
    python probe.py --backbone my_weights.pt --arch resnet50 --stem imagenet   # a plain state dict

Features of the train and validation .beton files (centre crop, no augmentation) are extracted
once and cached (probe_cache/ beside the results), so trying heads takes seconds. `--augment`
instead trains the linear and MLP heads on randomly cropped and flipped views, as the standard
linear evaluation does, and chooses their hyper-parameters by training on such views too (slower:
the backbone runs every epoch). Prints top-1 / top-5 and saves them to probe_<name>.json
(probe_random_init_seed<seed>.json for --random-init: baselines of several seeds side by side).

No tuning on the test split: each head's hyper-parameters (learning rate and weight decay; k for
k-NN) are chosen on a holdout of the training images (--holdout, drawn with --seed), the chosen
head is then fit on all the training images and the validation (test) split is scored once.
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import ffcv_ssl_common
from ffcv_ssl_common import (PRECISION_NAMES, RESNETS, STEMS, ViewConfig, autocast_dtype,
                             check_labels, check_settings, fingerprint, folder_problem,
                             make_backbone, make_eval_loader, make_ssl_loader, save_atomic,
                             subset_indices)


@dataclass
class Args:
    backbone: str = "runs/simclr/backbone.pt"
    """A backbone state dict (saved by simclr.py, barlowtwins.py, ...: backbone.json beside it
    says how to build it) or any torchvision ResNet state dict (then give --arch and --stem)."""
    train_beton: str = "data/fashion-mnist_train.beton"
    """Images the heads are fit on (label -1: unlabelled, left out)."""
    val_beton: str = "data/fashion-mnist_val.beton"
    """Images the heads are tested on (labelled)."""
    num_classes: int = 10
    """Classes of the heads (labels 0 .. num_classes - 1)."""
    arch: str | None = None
    """Architecture; default: from backbone.json."""
    width: int = 0
    """Channels of the first stage (the method files' --width); 0: from backbone.json, else
    torchvision's 64."""
    stem: Literal["from-json", "small", "small-stride2", "imagenet"] = "from-json"
    """The stem, as the method files' --stem (small: 3x3 stride-1 conv without max-pool);
    default: from backbone.json."""
    resolution: int = 0
    """Input side in pixels; 0: the training resolution from backbone.json (else 32)."""
    crop_ratio: float = 0.0
    """Centre crop of this fraction of the short side before the resize (ImageNet practice:
    0.875); 0: backbone.json's (the method files' --eval-crop-ratio), else 1.0."""
    random_init: bool = False
    """Probe the same architecture with random weights instead: the baseline SSL must beat."""
    heads: tuple[Literal["linear", "mlp", "knn"], ...] = ("linear", "mlp", "knn")
    """Which evaluations to run."""
    mlp_dims: tuple[int, ...] = (1024,)
    """Hidden widths of the MLP head (Linear-BN-ReLU each)."""
    epochs: int = 30
    """Epochs of head training."""
    lr: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    """AdamW learning rates tried (cosine decay); the best on the holdout is kept."""
    weight_decay: tuple[float, ...] = (5e-4,)
    """AdamW weight decays tried, with each learning rate."""
    batch_size: int = 1024
    """Batch of the heads' training."""
    knn_k: tuple[int, ...] = (10, 20, 50)
    """Neighbours that vote in k-NN, tried on the holdout."""
    holdout: float = 0.1
    """Fraction of the training images held out to choose the hyper-parameters above (0: no
    holdout; then each must have a single value)."""
    knn_temperature: float = 0.07
    """k-NN votes weighted by exp(cosine similarity / T) (Wu et al. 2018)."""
    augment: bool = False
    """Train the linear and MLP heads on random crops + flips of the train set (backbone frozen),
    their hyper-parameters chosen the same way, instead of on cached centre-crop features."""
    train_subset: int = 0
    """Fit the heads on this many training images drawn with `seed` (0: all); for quick looks."""
    num_workers: int = 0
    """Loader threads; 0: the machine's cores."""
    seed: int = 0
    """Seed of the random init (--random-init), the heads and the subset."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Backbone under bf16 or fp16 autocast, or in fp32 (the heads train in fp32); auto as in the
    method files: bf16 on CUDA GPUs from Ampere on and CPUs with AVX512-BF16 or AMX, fp16 on older
    CUDA GPUs with tensor cores, fp32 elsewhere."""
    out: str = ""
    """Results JSON; default: probe_<backbone name or random_init>.json beside the backbone."""
    cache: bool = True
    """Keep the features in <the results JSON's folder>/probe_cache/ (keyed by the weights, the
    data, the code, the device and the precision), so that trying other heads takes seconds."""


def validate(args: Args) -> None:
    """One line naming the flag and what it takes, before anything slow."""
    check_settings([
        ("--num-classes", args.num_classes, args.num_classes >= 1, "an integer >= 1"),
        ("--width", args.width, args.width == 0 or (args.width >= 16 and args.width % 16 == 0),
         "0 (from backbone.json) or a multiple of 16 (torchvision's ResNets: 64)"),
        ("--resolution", args.resolution, 0 <= args.resolution <= 4096,
         "0 (from backbone.json) or a side in pixels up to 4096"),
        ("--crop-ratio", args.crop_ratio, 0 <= args.crop_ratio <= 1,
         "0 (from backbone.json) or a fraction in (0, 1]"),
        ("--heads", args.heads, len(args.heads) >= 1, "one or more of linear, mlp, knn"),
        ("--mlp-dims", args.mlp_dims, min(args.mlp_dims, default=1) >= 1, "widths >= 1"),
        ("--epochs", args.epochs, args.epochs >= 1, "an integer >= 1"),
        ("--lr", args.lr, len(args.lr) >= 1 and min(args.lr, default=0) > 0, "values > 0"),
        ("--weight-decay", args.weight_decay, len(args.weight_decay) >= 1 and min(
            args.weight_decay, default=0) >= 0, "values >= 0"),
        ("--holdout", args.holdout, 0 <= args.holdout < 1, "a fraction in [0, 1)"),
        ("--batch-size", args.batch_size, args.batch_size >= 2,
         "an integer >= 2 (the heads' BatchNorm needs two images)"),
        ("--knn-k", args.knn_k, len(args.knn_k) >= 1 and min(args.knn_k, default=0) >= 1,
         "integers >= 1"),
        ("--knn-temperature", args.knn_temperature, args.knn_temperature > 0, "> 0"),
        ("--train-subset", args.train_subset, args.train_subset >= 0, ">= 0 (0: all images)"),
        ("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0 (0: the cores)"),
        ("--seed", args.seed, 0 <= args.seed < 2**32, "an integer in [0, 2^32)"),
        ("--out", args.out, not os.path.isdir(args.out), "a file name, not a folder")])
    problem = folder_problem(os.path.dirname(os.path.abspath(results_path(args))))
    if problem:
        raise ValueError(f"cannot write the results: {problem}; pass --out with a writable "
                         f"folder")
    grid = len(args.lr) * len(args.weight_decay) > 1 or len(args.knn_k) > 1
    if args.holdout == 0 and grid:
        raise ValueError(f"--holdout 0 with several values to choose from (--lr {args.lr}, "
                         f"--weight-decay {args.weight_decay}, --knn-k {args.knn_k}): give one "
                         f"value each, or a holdout fraction such as 0.1")


def results_path(args: Args) -> str:
    return args.out or os.path.join(os.path.dirname(args.backbone) or ".", "probe_" + (
        f"random_init_seed{args.seed}" if args.random_init
        else os.path.splitext(os.path.basename(args.backbone))[0]) + ".json")


def read_backbone_json(path: str) -> dict:
    """backbone.json as the method files write it ({} when there is none), every field checked:
    a damaged one is named in one line."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); delete it and give --arch and "
                         f"--stem") from None
    if not isinstance(meta, dict):
        problem = f"holds a {type(meta).__name__}, not an object"
    else:
        stem = meta.get("stem", STEMS["small"])
        conv = stem.get("conv1") if isinstance(stem, dict) else None
        checks = [
            ("arch", isinstance(meta.get("arch", ""), str)),
            ("width", isinstance(meta.get("width", 64), int)),
            ("resolution", isinstance(meta.get("resolution", 32), int)
             and 1 <= meta.get("resolution", 32) <= 4096),
            ("crop_ratio", isinstance(meta.get("crop_ratio", 1.0), (int, float))
             and 0 < meta.get("crop_ratio", 1.0) <= 1),
            ("stem", isinstance(stem, dict) and isinstance(conv, dict)
             and set(conv) == {"kernel_size", "stride", "padding"}
             and all(isinstance(v, int) and v >= 0 for v in conv.values())
             and conv["kernel_size"] >= 1 and conv["stride"] >= 1
             and isinstance(stem.get("maxpool"), bool))]
        bad = [name for name, ok in checks if not ok]
        if not bad:
            return meta
        problem = f"has a bad {bad[0]!r}: {meta.get(bad[0])!r}"
    raise ValueError(f"{path} {problem}; rewrite it as a method file exports it, or delete it "
                     f"and give --arch, --width, --stem and --resolution")


def build_backbone(args: Args) -> tuple[nn.Module, dict]:
    meta_path = os.path.join(os.path.dirname(args.backbone), "backbone.json")
    meta = read_backbone_json(meta_path)
    arch = args.arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"no {meta_path}: give --arch (and --stem) for a plain state dict")
    if args.stem == "from-json":  # (an older backbone.json said "small_stem": true or false)
        stem = meta.get("stem") or STEMS["small" if meta.get("small_stem") else "imagenet"]
    else:
        stem = STEMS[args.stem]
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(RESNETS)}")
    width = args.width or meta.get("width", 64)
    if not isinstance(width, int) or width < 16 or width % 16:
        raise ValueError(f"{meta_path}: width {width!r} is not a multiple of 16; fix it or give "
                         f"--width")
    torch.manual_seed(args.seed)  # the random init (--random-init): torchvision's
    net, _ = make_backbone(arch, stem, zero_init_residual=False, width=width)
    small = net.conv1.stride == (1, 1)
    if not args.random_init:
        if not os.path.isfile(args.backbone):
            raise FileNotFoundError(f"{args.backbone}: no such backbone; train one first "
                                    f"(python simclr.py) or pass --random-init")
        try:
            state = torch.load(args.backbone, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, corrupt, or a pickle of more than tensors
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"{args.backbone} cannot be loaded as a state dict ({reason}); "
                             f"give a backbone.pt exported by a method file or a plain "
                             f"torchvision state dict") from None
        if not isinstance(state, dict):
            raise ValueError(f"{args.backbone} holds a {type(state).__name__}, not a state dict")
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"{args.backbone} does not fit {arch} (width {width}, small stem: "
                             f"{small}): {first}; check --arch/--width/--stem") from None
    resolution = args.resolution or meta.get("resolution", 32)
    crop_ratio = args.crop_ratio or meta.get("crop_ratio", 1.0)
    return net, {"arch": arch, "width": width, "small_stem": small, "resolution": resolution,
                 "crop_ratio": crop_ratio}


@torch.no_grad()
def extract(net, loader, device, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats.append(net(x).float().cpu())
        labels.append(y.cpu().clone())  # ffcv reuses its batch buffers: keep a copy
    return torch.cat(feats), torch.cat(labels)


def cached_features(args, net, info, device, amp_dtype):
    """Features of both splits (centre crops), cached in probe_cache/ beside the results JSON,
    keyed by everything that changes them: the weights, the data (fingerprint), the crop, the
    subset, this code (probe.py and ffcv_ssl_common.py), torch, the device and the precision."""
    key = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        key.update(name.encode())
        key.update(tensor.detach().cpu().float().numpy().tobytes())
    for path in (args.train_beton, args.val_beton):
        key.update(json.dumps(fingerprint(path)).encode())
    for code in (__file__, ffcv_ssl_common.__file__):
        key.update(open(code, "rb").read())
    key.update(f"{info['resolution']}:{info['crop_ratio']}:{args.train_subset}:{args.seed}:"
               f"{amp_dtype}:{device.type}:{torch.__version__}".encode())
    cache = os.path.join(os.path.dirname(os.path.abspath(results_path(args))), "probe_cache",
                         f"features_{key.hexdigest()[:16]}.pt")
    if args.cache and os.path.exists(cache):
        return torch.load(cache, weights_only=True), cache
    out = {}
    for split, path in (("train", args.train_beton), ("val", args.val_beton)):
        indices = subset_indices(path, args.train_subset, args.seed) if split == "train" else None
        loader = make_eval_loader(path, info["resolution"], 512, args.num_workers, device=device,
                                  crop_ratio=info["crop_ratio"], indices=indices)
        out[split] = extract(net, loader, device, amp_dtype)
    if not args.cache:
        return out, None
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    save_atomic(out, cache)
    return out, cache


def make_head(kind: str, width: int, args: Args) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.BatchNorm1d(width, affine=False),
                             nn.Linear(width, args.num_classes))
    layers, d = [nn.BatchNorm1d(width, affine=False)], width
    for h in args.mlp_dims:
        layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, args.num_classes))


def topk(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Top-1, and top-5 where there are more than 5 classes (with 5 or fewer it is always 1)."""
    if logits.shape[1] <= 5:
        return {"top1": (logits.argmax(1) == y).float().mean().item()}
    top5 = logits.topk(5, dim=1).indices
    return {"top1": (top5[:, 0] == y).float().mean().item(),
            "top5": (top5 == y[:, None]).any(1).float().mean().item()}


def train_head(kind, args, width, batches, val_x, val_y, steps_per_epoch, lr, weight_decay,
               curve: list | None = None, train_xy=None):
    """AdamW with cosine decay; `batches()` yields (features, labels) for one epoch. With `curve`
    (a list), each epoch appends {"epoch", "train_top1" (on train_xy), "val_top1"}: how a head
    fits and overfits (experiments/claim_probing.py)."""
    torch.manual_seed(args.seed)
    head = make_head(kind, width, args).to(val_x.device)
    opt = torch.optim.AdamW(head.parameters(), lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        head.train()
        for x, y in batches():
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if curve is not None:
            head.eval()
            with torch.no_grad():
                curve.append({"epoch": epoch + 1, "train_top1": topk(head(train_xy[0]),
                                                                     train_xy[1])["top1"],
                              "val_top1": topk(head(val_x), val_y)["top1"]})
    head.eval()
    with torch.no_grad():
        return topk(head(val_x), val_y)


@torch.no_grad()
def knn(train_x, train_y, val_x, val_y, k, temperature, num_classes) -> dict:
    """Weighted k-NN (votes exp(cos / T)) on the features' device; similarities in chunks of at
    most 2^28 entries (1 GiB)."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    scores = []
    for chunk in val_x.split(max(1, min(1024, 2**28 // len(train_x)))):
        sim, idx = (chunk @ train_x.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        scores.append(votes)
    return topk(torch.cat(scores), val_y)


def main(args: Args) -> dict:
    validate(args)
    check_labels(args.train_beton, args.num_classes, unlabelled_ok=True)
    check_labels(args.val_beton, args.num_classes, unlabelled_ok=False)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    net, info = build_backbone(args)
    net = net.to(device, memory_format=torch.channels_last).eval()
    amp_dtype = autocast_dtype(args.precision, device)
    start = time.time()
    feats, cache = cached_features(args, net, info, device, amp_dtype)
    # The heads and the k-NN on the device (hours on the CPU at ImageNet scale), in fp32.
    train_x, train_y = (t.to(device) for t in feats["train"])
    val_x, val_y = (t.to(device) for t in feats["val"])
    labelled = train_y >= 0  # label -1: unlabelled (STL-10's unlabeled split), no use to a head
    train_images = subset_indices(args.train_beton, args.train_subset, args.seed)
    if train_images is None:  # the features' images, in their order (sorted)
        train_images = np.arange(len(train_y))
    train_images = train_images[labelled.cpu().numpy()]
    if not labelled.all():
        print(f"{int((~labelled).sum())} unlabelled training images (label -1) left out")
        if not labelled.any():
            raise ValueError(f"{args.train_beton} has no labelled images to fit the heads on")
        train_x, train_y = train_x[labelled], train_y[labelled]
    width = train_x.shape[1]
    results = {"backbone": "random init" if args.random_init else args.backbone, **info,
               "precision": PRECISION_NAMES[amp_dtype], "train_images": len(train_y),
               "val_images": len(val_y), "augment": args.augment, "features_cache": cache}
    generator = torch.Generator().manual_seed(args.seed)
    # The holdout that chooses the hyper-parameters: a seeded share of the training images.
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    n_hold = int(args.holdout * len(train_y))
    hold, fit = order[:n_hold], order[n_hold:]
    if args.holdout and (n_hold < 1 or len(fit) < 2):
        raise ValueError(f"--holdout {args.holdout} of {len(train_y)} training images leaves "
                         f"{n_hold} to choose with and {len(fit)} to fit; use more images")

    def batches_of(x, y):
        def batches():
            order = torch.randperm(len(y), generator=generator)
            for idx in order.to(x.device).split(args.batch_size):
                if len(idx) >= 2:  # a last batch of one would break the heads' BatchNorm
                    yield x[idx], y[idx]
        return batches, -(-len(y) // args.batch_size)

    def choose(kind) -> dict:
        """The hyper-parameters with the best holdout top-1 (the first of equals)."""
        if kind == "knn":
            grid = [{"k": k} for k in args.knn_k]
        else:
            grid = [{"lr": lr, "weight_decay": wd} for lr in args.lr for wd in args.weight_decay]
        if len(grid) == 1:
            return {**grid[0], "holdout_top1": None}
        if args.augment and kind != "knn":  # chosen on what the head is then trained on
            fit_batches, fit_steps = augmented(np.sort(train_images[fit.numpy()]))
        else:
            fit_batches, fit_steps = batches_of(train_x[fit], train_y[fit])
        scores = []
        for hp in grid:
            if kind == "knn":
                res = knn(train_x[fit], train_y[fit], train_x[hold], train_y[hold], hp["k"],
                          args.knn_temperature, args.num_classes)
            else:
                res = train_head(kind, args, width, fit_batches, train_x[hold], train_y[hold],
                                 fit_steps, **hp)
            scores.append(res["top1"])
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        return {**grid[best], "holdout_top1": scores[best],
                "holdout_grid": [{**hp, "top1": sc} for hp, sc in zip(grid, scores)]}

    def augmented(images):
        """Batches of (features, labels) of random crops + flips of `images` (file indices), a
        new draw every epoch: the standard linear evaluation's training views."""
        view = ViewConfig(resolution=info["resolution"], jitter_p=0, grayscale_p=0)
        loader = make_ssl_loader(args.train_beton, [view], min(args.batch_size, len(images)),
                                 args.num_workers, args.seed, device=device, indices=images)

        def batches():
            for x, y in loader:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                                     enabled=amp_dtype is not None):
                    h = net(x).float()
                yield h, y.clone()
        return batches, len(loader)

    if args.augment:
        batches, steps = augmented(train_images)
    else:
        batches, steps = batches_of(train_x, train_y)
    for kind in args.heads:
        chosen = choose(kind)  # on the holdout; then fit on every training image, test once
        hp = {k: v for k, v in chosen.items() if not k.startswith("holdout")}
        if kind == "knn":
            results["knn"] = knn(train_x, train_y, val_x, val_y, hp["k"], args.knn_temperature,
                                 args.num_classes)
        else:
            results[kind] = train_head(kind, args, width, batches, val_x, val_y, steps, **hp)
        results[kind]["chosen"] = chosen
        top5 = (f"  top-5 {100 * results[kind]['top5']:.2f}%" if "top5" in results[kind]
                else "")
        held = (f" (chosen on the holdout: {100 * chosen['holdout_top1']:.2f}%)"
                if chosen["holdout_top1"] is not None else "")
        print(f"{kind:>6} probe: top-1 {100 * results[kind]['top1']:.2f}%{top5}  "
              f"{', '.join(f'{k} {v:g}' for k, v in hp.items())}{held}", flush=True)
    results["seconds"] = time.time() - start
    out = results_path(args)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump({**results, "args": asdict(args)}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (OSError, ValueError) as err:  # bad input: one line, no traceback
        sys.exit(f"error: {err}")
