"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.

Bardes, Ponce, LeCun, ICLR 2022, https://arxiv.org/abs/2105.04906. Same skeleton as simclr.py
(`diff simclr.py vicreg.py` shows the method): the loss and its three terms, a wide three-layer
projector, the BYOL augmentation recipe, LARS with base lr 0.2 x batch/256 and weight decay 1e-6.

    python write_beton.py                                  # data/fashion-mnist_{train,val}.beton
    python vicreg.py --batch-size 256                      # one GPU
    torchrun --nproc-per-node 4 vicreg.py                  # DDP: --batch-size is the global batch
    python probe.py --backbone runs/vicreg/backbone.pt

Measured (README, "Does it learn?"): Fashion-MNIST, 28 px, ResNet-18 with the small stem, projector
2048-2048-2048, 2 epochs on a 2-core CPU: linear probe 84.5% top-1 against 83.5% for the same
network with random weights; MLP probe 88.3% against 87.3%; k-NN 82.8% against 82.6%.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from tqdm import tqdm

from ffcv_ssl_common import (ViewConfig, byol_views, make_eval_loader, make_ssl_loader,
                             subset_indices)


@dataclass
class Args:
    # ---- data ----
    train_beton: str = "data/fashion-mnist_train.beton"
    """Training images (write them with write_beton.py)."""
    val_beton: str = "data/fashion-mnist_val.beton"
    """Validation images, for the online probe."""
    num_classes: int = 10
    """Classes of the online linear probe."""
    view1: ViewConfig = field(default_factory=lambda: byol_views(32)[0])
    """First view's augmentations (BYOL recipe: blur 1.0, no solarization)."""
    view2: ViewConfig = field(default_factory=lambda: byol_views(32)[1])
    """Second view's augmentations."""
    train_subset: int = 0
    """Train on this many images drawn at random with `seed` (0: all); for quick runs."""
    num_workers: int = 2
    """Loader threads per process."""
    # ---- model ----
    arch: str = "resnet18"
    """Any torchvision ResNet: resnet18/34/50/101/152, resnext*, wide_resnet*."""
    stem: Literal["auto", "small", "imagenet"] = "auto"
    """small: 3x3 conv stride 1, no max-pool (CIFAR-style); auto: small when the views are
    64 px or less, since the ImageNet stem divides the resolution by 4 before the first block."""
    projector_dims: tuple[int, ...] = (8192, 8192, 8192)
    """Projector MLP widths after the backbone: hidden layers Linear-BN-ReLU, last Linear."""
    # ---- optimisation ----
    epochs: int = 100
    batch_size: int = 256
    """Global batch (split over DDP processes)."""
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    base_lr: float = 0.2
    """Peak learning rate = base_lr x batch_size / 256 (LARS; use ~0.001 for AdamW)."""
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars_eta: float = 0.001
    """LARS trust coefficient."""
    warmup_epochs: float = 10
    """Linear warm-up, then cosine decay to 0."""
    probe_lr: float = 1e-3
    """Online linear probe (AdamW, its own optimiser)."""
    # ---- loss ----
    sim_coeff: float = 25.0
    """lambda: weight of the invariance term (mean squared error between the embeddings)."""
    std_coeff: float = 25.0
    """mu: weight of the variance term (hinge on each dimension's standard deviation)."""
    cov_coeff: float = 1.0
    """nu: weight of the covariance term (off-diagonal covariances)."""
    # ---- run ----
    out_dir: str = "runs/vicreg"
    """Checkpoints, logs, exported backbone."""
    resume: bool = True
    """Continue from out_dir/checkpoint.pt when it exists (--no-resume starts over)."""
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or plain fp32. auto: bf16 where the hardware computes in bf16 (CUDA GPUs from
    Ampere on; CPUs with AVX512-BF16 or AMX, about 2x faster than fp32), fp32 elsewhere: other
    CPUs emulate bf16, 12x slower than fp32 for a ResNet-18 step on an AVX2-only EPYC."""
    compile: bool = False
    """torch.compile the model."""
    sync_bn: bool = False
    """SyncBatchNorm under DDP."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    max_steps: int = 0
    """Stop after this many steps in all (0: no limit); for smoke tests."""


# ----------------------------------------------------------------------------------------------
# Model: backbone + projector (+ the online probe, trained on detached features).
# ----------------------------------------------------------------------------------------------
RESNETS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n.startswith(("resnet", "resnext", "wide_resnet"))]


def make_backbone(arch: str, small_stem: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; returns it and its feature width."""
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(RESNETS)}")
    net = torchvision.models.get_model(arch, weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net, width


def mlp(dims: tuple[int, ...]) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    def __init__(self, args: Args, small_stem: bool):
        super().__init__()
        self.backbone, width = make_backbone(args.arch, small_stem)
        self.projector = mlp((width, *args.projector_dims))
        self.probe = nn.Linear(width, args.num_classes)
        self.coeffs = (args.sim_coeff, args.std_coeff, args.cov_coeff)

    def forward(self, x1, x2, y):
        h1, h2 = self.backbone(x1), self.backbone(x2)  # (B, width)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        # The loss in fp32: under bf16 autocast its matmuls and sums would run in bf16.
        with torch.autocast(x1.device.type, enabled=False):
            loss, terms = vicreg_loss(z1, z2, *self.coeffs)
        # The probe sees features but sends no gradient into the backbone.
        probe_loss = F.cross_entropy(self.probe(h1.detach()), y)
        return loss, probe_loss, terms


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m - torch.diag_embed(torch.diagonal(m))


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0):
    """VICReg (paper eqs. 1-6): returns the total and its three terms, named as in the paper.

    invariance (repr): mean squared error between z1 and z2;
    variance (std): mean over dimensions of ReLU(1 - sqrt(Var + 1e-4)), unbiased variance along
        the batch, averaged over the two branches;
    covariance (cov): sum of squared off-diagonal covariances / D, summed over the two branches;
    total = sim_coeff * repr + std_coeff * std + cov_coeff * cov.
    Under DDP the embeddings are gathered with their gradients, so variance and covariance are
    those of the global batch.
    """
    if dist.is_initialized():
        z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
    std1, std2 = torch.sqrt(z1.var(0) + 1e-4), torch.sqrt(z2.var(0) + 1e-4)
    std_loss = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)  # (D, D)
    cov_loss = off_diagonal(cov1).pow(2).sum() / d + off_diagonal(cov2).pow(2).sum() / d
    total = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return total, {"repr": repr_loss, "std": std_loss, "cov": cov_loss}


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
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


def param_groups(model: nn.Module) -> list[dict]:
    """Weights (ndim > 1) get weight decay and LARS adaptation; biases and BN parameters don't."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights}, {"params": others, "weight_decay": 0.0, "lars_exclude": True}]


def make_optimizer(args: Args, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if args.optimizer == "lars":
        return LARS(groups, lr, args.weight_decay, args.momentum, args.lars_eta)
    for g in groups:
        g.pop("lars_exclude", None)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr, weight_decay=args.weight_decay)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Evaluation, checkpoints, logging
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def probe_accuracy(model: VICReg, loader, device, bf16: bool) -> float:
    model.eval()
    correct = torch.zeros(2, device=device)  # (correct, seen)
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.probe(model.backbone(x))
        correct += torch.stack([(logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
    if dist.is_initialized():
        dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_curves(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    epochs = [r for r in rows if "probe_acc" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], marker="o")
    axes[0].set(xlabel="epoch", ylabel="VICReg loss")
    axes[1].plot([r["epoch"] for r in epochs], [100 * r["probe_acc"] for r in epochs], marker="o")
    axes[1].set(xlabel="epoch", ylabel="online linear probe top-1 (%)")
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    os.replace(png_path + ".tmp.png", png_path)
    plt.close(fig)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (see Args.precision)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:  # Linux, as ffcv
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
    if distributed:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
    main_process = rank == 0
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must divide over {world} processes")
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_fast(device))
    small_stem = args.stem == "small" or (args.stem == "auto" and args.view1.resolution <= 64)
    if main_process:
        os.makedirs(args.out_dir, exist_ok=True)
        print("python " + " ".join(sys.argv))
        resolved = {"device": str(device), "world": world, "bf16": bf16, "small_stem": small_stem}
        print(json.dumps({**asdict(args), "resolved": resolved}, indent=1))
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)

    # Data
    local_batch = args.batch_size // world
    indices = subset_indices(args.train_beton, args.train_subset, args.seed)
    train_loader = make_ssl_loader(args.train_beton, [args.view1, args.view2], local_batch,
                                   args.num_workers, args.seed, distributed, device,
                                   indices=indices)
    val_loader = make_eval_loader(args.val_beton, args.view1.resolution, 512, args.num_workers,
                                  distributed, device)

    # Model and optimisers
    model = VICReg(args, small_stem).to(device, memory_format=torch.channels_last)
    if distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ssl_params = nn.ModuleList([model.backbone, model.projector])
    peak_lr = args.base_lr * args.batch_size / 256
    optimizer = make_optimizer(args, ssl_params, peak_lr)
    probe_optimizer = torch.optim.AdamW(model.probe.parameters(), args.probe_lr)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    start_epoch, step = 0, 0
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        for key in ("arch", "stem", "projector_dims", "optimizer", "num_classes"):
            if str(ckpt["args"][key]) != str(getattr(args, key)):
                raise ValueError(f"{ckpt_path} was trained with --{key.replace('_', '-')} "
                                 f"{ckpt['args'][key]}, not {getattr(args, key)}; resume with the "
                                 f"same or pass --no-resume to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        probe_optimizer.load_state_dict(ckpt["probe_optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        if main_process:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")
    train_loader.next_epoch = start_epoch  # the batches the run would have seen

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda
                                                  else None)
    if args.compile:
        net = torch.compile(net)
    writer = None
    if args.tensorboard and main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("--tensorboard needs the tensorboard package: pip install "
                             "tensorboard") from err
        writer = SummaryWriter(args.out_dir)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    result = {}
    for epoch in range(start_epoch, args.epochs):
        net.train()
        losses, start = [], time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not main_process, leave=False)
        for x1, x2, y in bar:
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, probe_loss, terms = net(x1, x2, y)
            optimizer.zero_grad(set_to_none=True)
            probe_optimizer.zero_grad(set_to_none=True)
            (loss + probe_loss).backward()
            optimizer.step()
            probe_optimizer.step()
            losses.append(torch.stack([loss.detach(), *[t.detach() for t in terms.values()]]))
            step += 1
            if step % 20 == 0:
                value = loss.item()  # a CPU-GPU sync point: only every 20 steps
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss is {value} at step {step}; lower --base-lr "
                        f"(the last good checkpoint, if any, is kept in {ckpt_path})")
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
                if main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": value, "lr": lr}) + "\n")
            if args.max_steps and step >= args.max_steps:
                break
        means = torch.stack(losses).mean(0).tolist()  # loss, then each term
        epoch_loss, term_means = means[0], dict(zip(terms, means[1:]))
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"loss is {epoch_loss} in epoch {epoch}; lower --base-lr "
                                     f"(the last good checkpoint is kept in {ckpt_path})")
        images_per_s = len(losses) * args.batch_size / (time.time() - start)
        acc = probe_accuracy(model, val_loader, device, bf16)
        result = {"epoch": epoch + 1, "step": step, "loss": epoch_loss, **term_means, "lr": lr,
                  "images_per_s": images_per_s, "probe_acc": acc}
        if main_process:
            print(f"epoch {epoch + 1}/{args.epochs} | loss {epoch_loss:.4f} | lr {lr:.4g} | "
                  f"{images_per_s:.0f} img/s | online probe top-1 {100 * acc:.2f}%", flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(result) + "\n")
            if writer:
                for key, value in result.items():
                    writer.add_scalar(key, value, step)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "probe_optimizer": probe_optimizer.state_dict(), "epoch": epoch + 1,
                         "step": step, "rng": torch.get_rng_state(), "args": asdict(args)},
                        ckpt_path)
        if args.max_steps and step >= args.max_steps:
            break

    if main_process:
        # The backbone alone: torchvision's model with fc = Identity() (and the small stem)
        # takes it with load_state_dict(strict=True); backbone.json says how to build it.
        save_atomic(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))
        with open(os.path.join(args.out_dir, "backbone.json"), "w") as f:
            json.dump({"arch": args.arch, "small_stem": small_stem,
                       "resolution": args.view1.resolution, "method": "vicreg"}, f)
        if os.path.exists(log_path):
            plot_curves(log_path, os.path.join(args.out_dir, "curves.png"))
        if writer:
            writer.close()
    if distributed:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
