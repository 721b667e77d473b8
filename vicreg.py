"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.

Bardes, Ponce, LeCun, ICLR 2022, https://arxiv.org/abs/2105.04906. Same skeleton as simclr.py
(`diff simclr.py vicreg.py` shows the method): the loss and its three terms, a wide three-layer
projector, the BYOL augmentation recipe, LARS with base lr 0.2 x batch/256 and weight decay 1e-6.

    python write_beton.py                                  # data/fashion-mnist_{train,val}.beton
    python vicreg.py --batch-size 256                      # one GPU
    torchrun --nproc-per-node 4 vicreg.py                  # DDP: --batch-size is the global batch
    python probe.py --backbone runs/vicreg/backbone.pt

Killed or pre-empted? Run the same command again: it resumes exactly where the last checkpoint
(every epoch, every --checkpoint-every-min, and on SIGTERM / SIGUSR1) left it.

Measured (README, "Does it learn?"; 2026-11-27, 2-core Xeon with AMX, bf16): Fashion-MNIST,
28 px, the CPU recipe of benchmarks/bench_fashion_mnist.py (ResNet-18 at half width, --width 32,
with the stride-2 small stem and torchvision's init, batch 128, LARS with solo-learn's CIFAR
settings: lr 0.3, weight decay 1e-4, eta 0.02; crops of 30-100%, no blur, projector
2048-2048-2048), 10 minutes of training (1,725 steps): linear probe 85.7% top-1 against 79.3% +-
0.6 for the same network with random weights (three seeds), MLP 86.3% against 81.6%, k-NN 82.4%
against 78.1% (+6.4 / +4.7 / +4.3). At full width, 10 minutes (438 steps): 85.2% linear against
80.8% +- 0.7 (+4.4). With this file's ImageNet LARS settings (eta 0.001) 5 minutes gave 78.3%
linear: below random init.
"""

import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from tqdm import tqdm

from ffcv_ssl_common import (ViewConfig, check_labels, make_eval_loader, make_ssl_loader,
                             byol_views, subset_indices)

METHOD = "vicreg"  # names the plots and exports; everything else below the loss is shared


@dataclass
class Args:
    # ---- data ----
    train_beton: tuple[str, ...] = ("data/fashion-mnist_train.beton",)
    """Training images: one .beton or several (e.g. STL-10's train and unlabeled files). Labels
    are only used by the online probe; label -1 marks an unlabelled image."""
    val_beton: str = "data/fashion-mnist_val.beton"
    """Validation images (labelled), for the online probe."""
    num_classes: int = 10
    """Classes of the online linear probe (labels 0 .. num_classes - 1)."""
    view1: ViewConfig = field(default_factory=lambda: byol_views(32)[0])
    """First view's augmentations (BYOL recipe: blur 1.0, no solarization)."""
    view2: ViewConfig = field(default_factory=lambda: byol_views(32)[1])
    """Second view's augmentations."""
    train_subset: int = 0
    """Train on this many images drawn at random with `seed` (0: all); for quick runs."""
    num_workers: int = 2
    """Loader threads per process (the random views do not depend on it)."""
    order: Literal["random", "quasi_random"] = "random"
    """Training order: a fresh permutation every epoch, or ffcv's quasi-random order (random
    within a window of the file's pages: large reads, for data sets larger than RAM, with
    --no-os-cache; not under torchrun in ffcv 1.0.2)."""
    os_cache: bool = True
    """Read the .beton files through the OS page cache (they should fit in RAM); --no-os-cache:
    each process reads and caches what it needs itself."""
    resolution_schedule: tuple[int, int, int] | None = None
    """Progressive resolution (ffcv-imagenet, FFCV-SSL): START END RAMP_EPOCHS: the views are
    START px in epoch 0, grow linearly to END px at epoch RAMP_EPOCHS (multiples of 8 in between)
    and stay there; END replaces the views' resolution (evaluation, stem and export use it).
    Early epochs cost less; a resumed run takes up its epoch's resolution again."""
    # ---- model ----
    arch: str = "resnet18"
    """Any torchvision ResNet: resnet18/34/50/101/152, resnext*, wide_resnet*."""
    stem: Literal["auto", "small", "small-stride2", "imagenet"] = "auto"
    """small: 3x3 conv stride 1, no max-pool (CIFAR-style); small-stride2: the same conv with
    stride 2 (4x fewer positions in every block: ~3x cheaper steps at 28 px); imagenet: 7x7
    stride 2 + max-pool; auto: small when the views are 64 px or less, since the ImageNet stem
    divides the resolution by 4 before the first block."""
    width: int = 64
    """Channels of the ResNet's first stage (torchvision: 64), doubled at each stage as there:
    32 costs a quarter of the multiply-adds (the CPU demo's), 128 four times as many."""
    zero_init_residual: bool = True
    """Start each residual block's last BatchNorm at zero (the official codes do): every block
    starts as the identity. --no-zero-init-residual keeps torchvision's default init."""
    projector_dims: tuple[int, ...] = (8192, 8192, 8192)
    """Projector MLP widths after the backbone: hidden layers Linear-BN-ReLU, last Linear."""
    # ---- optimisation ----
    epochs: int = 100
    """Passes over the training set; the learning-rate schedule spans all of them (with
    --time-budget-min: the most epochs trained)."""
    time_budget_min: float = 0.0
    """Train for this many minutes of wall-clock instead (0: off): warm-up and cosine decay run
    over the fraction of the budget used, so any machine ends its schedule on time; evaluation,
    checkpoints and the loader's start-up are not counted. The steps trained then depend on the
    machine's speed: a budgeted run is not bit-reproducible (log.jsonl has each step's lr)."""
    batch_size: int = 256
    """Global batch (split over DDP processes)."""
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    """LARS as in the paper; SGD or AdamW (same parameter groups) to compare."""
    base_lr: float = 0.2
    """Peak learning rate = base_lr x batch_size / 256 (LARS; use ~0.001 for AdamW)."""
    weight_decay: float = 1e-6
    """Weight decay of the weights (biases and BatchNorm parameters get none)."""
    momentum: float = 0.9
    """Momentum of LARS and SGD."""
    lars_eta: float = 0.001
    """LARS trust coefficient: a step moves a weight tensor by lr x eta of its norm (before
    momentum). The ImageNet recipes' 0.001 suits their many thousand steps; short runs need more
    (solo-learn's CIFAR recipes: 0.02; README, "Does it learn?")."""
    warmup_epochs: float = 10
    """Linear warm-up, then cosine decay to 0 (with --time-budget-min: warm-up over the fraction
    warmup_epochs / epochs of the budget)."""
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
    """Continue from out_dir/checkpoint.pt if it exists; refused when a setting that changes the
    result differs. --no-resume starts over: the checkpoint, log and exports in out_dir are
    deleted."""
    checkpoint_every_min: float = 10.0
    """Minutes between checkpoints within an epoch (0: only at the end of each epoch). SIGTERM and
    SIGUSR1 (sent by clusters before pre-emption) also save one, then stop the run."""
    seed: int = 0
    """Seed of the weights' initialisation, the data order and every augmentation."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """bf16 or fp16 autocast, or plain fp32. auto: bf16 where the hardware computes in bf16 (CUDA
    GPUs from Ampere on; CPUs with AVX512-BF16 or AMX, about 2x faster than fp32); fp16 on older
    CUDA GPUs with tensor cores (V100, T4: compute capability 7.x), with a gradient scaler whose
    state is saved in checkpoints; fp32 elsewhere: other CPUs emulate bf16, 12x slower than fp32
    for a ResNet-18 step on an AVX2-only EPYC."""
    tf32: bool = True
    """On CUDA GPUs from Ampere on, fp32 matmuls and convolutions (all of an fp32 run, the loss of
    a mixed one) in TF32, several times faster; --no-tf32 for full fp32."""
    compile: bool = False
    """torch.compile the model."""
    sync_bn: bool = True
    """SyncBatchNorm under DDP on GPUs: BatchNorm statistics over the global batch, as in the
    official code. torch has no CPU SyncBatchNorm: CPU processes normalise over their own share."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline logs to disk
    without an account or a network). The run's id is stable per --out-dir: resumes continue it."""
    max_steps: int = 0
    """Stop after this many steps in all (0: no limit), with a checkpoint; for smoke tests."""


# Settings that do not change what is trained: a run may resume with other values of these.
RUN_ONLY = ("num_workers", "os_cache", "out_dir", "resume", "checkpoint_every_min", "device",
            "compile", "tensorboard", "wandb", "max_steps")


def validate(args: Args) -> None:
    """Every setting checked before anything slow: one line naming the flag and what it takes."""
    rules = [  # (flag, value, allowed?, what is allowed)
        ("--num-classes", args.num_classes, args.num_classes >= 1, "an integer >= 1"),
        ("--train-subset", args.train_subset, args.train_subset >= 0, ">= 0 (0: all images)"),
        ("--num-workers", args.num_workers, args.num_workers >= 1, "an integer >= 1"),
        ("--arch", args.arch, args.arch in RESNETS, "one of " + ", ".join(RESNETS)),
        ("--width", args.width, args.width >= 16 and args.width % 16 == 0,
         "a multiple of 16 (torchvision's ResNets: 64)"),
        ("--projector-dims", args.projector_dims,
         len(args.projector_dims) >= 1 and min(args.projector_dims, default=0) >= 1,
         "one or more widths >= 1"),
        ("--epochs", args.epochs, args.epochs >= 1, "an integer >= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 2,
         "an integer >= 2 (BatchNorm and the loss compare images within the batch)"),
        ("--base-lr", args.base_lr, args.base_lr > 0, "> 0"),
        ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
        ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)"),
        ("--lars-eta", args.lars_eta, args.lars_eta > 0, "> 0"),
        ("--warmup-epochs", args.warmup_epochs, 0 <= args.warmup_epochs <= args.epochs,
         "in [0, --epochs]"),
        ("--probe-lr", args.probe_lr, args.probe_lr > 0, "> 0"),
        ("--out-dir", args.out_dir, bool(args.out_dir.strip()) and (
            os.path.isdir(args.out_dir) or not os.path.exists(args.out_dir)), "a folder"),
        ("--checkpoint-every-min", args.checkpoint_every_min, args.checkpoint_every_min >= 0,
         ">= 0 (0: at the end of each epoch only)"),
        ("--seed", args.seed, 0 <= args.seed < 2**32, "an integer in [0, 2^32)"),
        ("--max-steps", args.max_steps, args.max_steps >= 0, ">= 0 (0: no limit)"),
        ("--time-budget-min", args.time_budget_min, args.time_budget_min >= 0,
         ">= 0 minutes (0: train --epochs epochs)"),
        ("--resolution-schedule", args.resolution_schedule, args.resolution_schedule is None
         or (8 <= args.resolution_schedule[0] <= args.resolution_schedule[1] <= 4096
             and args.resolution_schedule[2] >= 1),
         "START END RAMP_EPOCHS with 8 <= START <= END <= 4096 and RAMP_EPOCHS >= 1"),
        # ALGO LOGIC: the method's own settings
        ("--sim-coeff", args.sim_coeff, args.sim_coeff >= 0, ">= 0 (the paper: 25)"),
        ("--std-coeff", args.std_coeff, args.std_coeff >= 0, ">= 0 (the paper: 25)"),
        ("--cov-coeff", args.cov_coeff, args.cov_coeff >= 0, ">= 0 (the paper: 1)"),
    ]
    for flag, value, allowed, what in rules:
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            allowed = False  # nan and inf pass some comparisons above
        if not allowed:
            raise ValueError(f"{flag} {value}: must be {what}")
    for name in ("view1", "view2"):
        getattr(args, name).validate(f"--{name}.")


# ----------------------------------------------------------------------------------------------
# Model: backbone + projector (+ the online probe, trained on detached features).
# ----------------------------------------------------------------------------------------------
RESNETS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n.startswith(("resnet", "resnext", "wide_resnet"))]


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet `arch` (its blocks, depths and groups) with `width` channels in its
    first stage instead of 64, doubled at each stage as there: width 32 has a quarter of the
    parameters and multiply-adds of torchvision's (the CPU demo's encoder, ~4x faster steps)."""

    def __init__(self, arch: str, width: int, zero_init_residual: bool):
        ref = torchvision.models.get_model(arch, weights=None)
        self.width = width
        super().__init__(type(ref.layer1[0]), [len(ref.layer1), len(ref.layer2),
                                               len(ref.layer3), len(ref.layer4)],
                         zero_init_residual=zero_init_residual, groups=ref.groups,
                         width_per_group=ref.base_width)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)  # torchvision's, `width` wide
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(self.inplanes, 1000)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage takes the stem's `width` channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def make_backbone(arch: str, stem: str, zero_init_residual: bool = True,
                  width: int = 64) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (ScaledResNet unless width is torchvision's
    64); returns it and its feature width."""
    if arch not in RESNETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(RESNETS)}")
    if width == 64:
        net = torchvision.models.get_model(arch, weights=None,
                                           zero_init_residual=zero_init_residual)
    else:
        net = ScaledResNet(arch, width, zero_init_residual)
    features = net.fc.in_features
    net.fc = nn.Identity()
    if stem in ("small", "small-stride2"):
        stride = 1 if stem == "small" else 2
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride, 1, bias=False)
        net.maxpool = nn.Identity()
    return net, features


def epoch_resolution(schedule: tuple[int, int, int] | None, resolution: int, epoch: int) -> int:
    """The views' side in `epoch`: `resolution` without a schedule; else START, growing linearly
    to END at epoch RAMP_EPOCHS, rounded down to a multiple of 8 (ffcv-imagenet: 32) but not
    below START."""
    if schedule is None:
        return resolution
    start, end, ramp = schedule
    if epoch >= ramp:
        return end
    return max(start, (start + (end - start) * epoch // ramp) // 8 * 8)


def resolve_stem(stem: str, resolution: int) -> str:
    """--stem auto: the small stem for views of 64 px or less, the ImageNet stem above."""
    return ("small" if resolution <= 64 else "imagenet") if stem == "auto" else stem


def stem_spec(net: nn.Module) -> dict:
    """How the backbone's stem was built, for backbone.json: probe.py rebuilds it from this."""
    c = net.conv1
    return {"conv1": {"kernel_size": c.kernel_size[0], "stride": c.stride[0],
                      "padding": c.padding[0]}, "maxpool": isinstance(net.maxpool, nn.MaxPool2d)}


def mlp(dims: tuple[int, ...], last_bias: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden width, then a Linear (with a bias if `last_bias`)."""
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    return nn.Sequential(*layers)


def probe_loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled images of the batch (label -1: unlabelled, skipped); 0
    when there are none. No data-dependent branch: no CPU-GPU sync."""
    total = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
    return total / (y >= 0).sum().clamp(min=1)


class VICReg(nn.Module):
    def __init__(self, args: Args, stem: str):
        super().__init__()
        self.backbone, width = make_backbone(args.arch, stem, args.zero_init_residual,
                                                   args.width)
        # No bias on the last layer (the official code): the loss standardises or centres z.
        self.projector = mlp((width, *args.projector_dims), last_bias=False)
        self.probe = nn.Linear(width, args.num_classes)
        self.coeffs = (args.sim_coeff, args.std_coeff, args.cov_coeff)

    def forward(self, x1, x2, y):
        # Each view through the network alone (the official code): BatchNorm per view.
        h1, h2 = self.backbone(x1), self.backbone(x2)  # (B, width)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        # The loss in fp32: under bf16 autocast its matmuls and sums would run in bf16.
        with torch.autocast(x1.device.type, enabled=False):
            loss, terms = vicreg_loss(z1, z2, *self.coeffs)  # ALGO LOGIC
        # The probe sees features but sends no gradient into the backbone.
        probe_loss = probe_loss_of(self.probe(h1.detach()), y)
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


def learning_rate(progress: float, warmup: float, peak: float) -> float:
    """`progress`: the fraction of training done (steps, or minutes of --time-budget-min).
    Linear warm-up from 0 to `peak` over the first `warmup` of it, then cosine decay to 0."""
    if progress < warmup:
        return peak * progress / warmup
    after = (progress - warmup) / max(1e-12, 1 - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, after)))


def set_learning_rates(args: Args, optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Evaluation and logging
MONITOR_IMAGES = 10_000  # validation images for the k-NN and RankMe monitors


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype: torch.dtype | None) -> dict:
    """The epoch's monitors on the validation set: the online linear probe's top-1 (every
    image, every process's share), and on the features of the first MONITOR_IMAGES images
    (gathered from every process): k-NN top-1 and RankMe."""
    model.eval()
    correct = torch.zeros(2, device=device)  # (correct, seen)
    feats, labels, kept = [], [], 0
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            h = model.backbone(x)
            logits = model.probe(h)
        correct += torch.stack([(logits.argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
        if kept < MONITOR_IMAGES:
            feats.append(h.float()[:MONITOR_IMAGES - kept])
            labels.append(y[:MONITOR_IMAGES - kept].clone())  # ffcv reuses its buffers
            kept += len(feats[-1])
    feats, labels = torch.cat(feats), torch.cat(labels)
    if dist.is_initialized():
        dist.all_reduce(correct)
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (feats.cpu(), labels.cpu()))
        feats = torch.cat([f for f, _ in shares])[:MONITOR_IMAGES].to(device)
        labels = torch.cat([y for _, y in shares])[:MONITOR_IMAGES].to(device)
    model.train()
    return {"probe_acc": (correct[0] / correct[1]).item(),
            "knn_acc": knn_leave_one_out(feats, labels), "rankme": rankme(feats)}


def knn_leave_one_out(feats: torch.Tensor, labels: torch.Tensor, k: int = 20,
                      temperature: float = 0.07) -> float:
    """Top-1 of weighted k-NN (Wu et al. 2018, as solo-learn and lightly monitor): each image is
    classified by the votes exp(cosine / T) of its k nearest other images of the set."""
    feats = F.normalize(feats, dim=1)
    k = min(k, len(feats) - 1)
    classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, len(feats), 1024):
        sim = feats[start:start + 1024] @ feats.T  # (chunk, N)
        rows = torch.arange(len(sim), device=feats.device)
        sim[rows, rows + start] = -float("inf")  # not its own neighbour
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=feats.device)
        votes.scatter_add_(1, labels[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == labels[start:start + 1024]).sum().item()
    return correct / len(feats)


def rankme(feats: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023, eq. 1): exp of the entropy of the
    normalised singular values of the (N, d) feature matrix, an effective rank between 1 and
    min(N, d) that needs no labels: it tracks downstream accuracy and falls on collapse."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over DDP processes (the logged numbers are the whole batch's, not rank 0's)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def plot_curves(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    steps = [r for r in rows if "probe_acc" not in r]
    epochs = [r for r in rows if "probe_acc" in r]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o", label="epoch")
    axes[0].set(xlabel="step", ylabel=f"{METHOD} loss")
    x = [r["epoch"] for r in epochs]
    axes[1].plot(x, [100 * r["probe_acc"] for r in epochs], marker="o", label="linear probe")
    axes[1].plot(x, [100 * r["knn_acc"] for r in epochs], marker="s", label="k-NN (k=20)")
    axes[1].set(xlabel="epoch", ylabel="online val top-1 (%)")
    axes[1].legend()
    axes[2].plot(x, [r["rankme"] for r in epochs], marker="o")
    axes[2].set(xlabel="epoch", ylabel="RankMe of the features")
    axes[3].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    axes[3].set(xlabel="step", ylabel="learning rate")
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype --precision means on `device` (None: fp32, no autocast)."""
    if precision == "auto":
        if bf16_is_fast(device):
            return torch.bfloat16
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0):
            return torch.float16  # tensor cores without bf16: V100, T4
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


# ----------------------------------------------------------------------------------------------
# Infrastructure: processes, provenance, checkpoints, pre-emption. Identical in every method file.
# ----------------------------------------------------------------------------------------------
def setup_processes(args: Args) -> tuple[torch.device, int, int]:
    """(device, rank, world). Under torchrun (RANK and WORLD_SIZE set): one process per GPU with
    NCCL, or CPU processes with gloo; otherwise one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return device, dist.get_rank(), dist.get_world_size()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu"), 0, 1


def save_provenance(args: Args, resolved: dict) -> None:
    """args.json (the resolved arguments, the command, the git commit) and a copy of the code
    that ran, in out_dir/code/."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--",
                                     "*.py"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    info = {**asdict(args), "resolved": resolved, "command": sys.argv,
            "git_commit": commit, "git_uncommitted_changes": dirty,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    with open(os.path.join(args.out_dir, "args.json.tmp"), "w") as f:
        json.dump(info, f, indent=1)
    os.replace(os.path.join(args.out_dir, "args.json.tmp"), os.path.join(args.out_dir, "args.json"))
    os.makedirs(os.path.join(args.out_dir, "code"), exist_ok=True)
    for name in (os.path.basename(__file__), "ffcv_ssl_common.py"):
        shutil.copyfile(os.path.join(here, name), os.path.join(args.out_dir, "code", name))


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """{"view1.resolution": 32, ...}, tuples as lists: saved and current settings compare."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.loads(json.dumps(value))
    return out


PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
CHECKPOINT_KEYS = {"model", "optimizer", "probe_optimizer", "epoch", "batch", "step", "sums",
                   "rng", "args", "log_bytes", "method", "elapsed", "scaler"}


def load_checkpoint(path: str, args: Args) -> dict:
    """The checkpoint, if it is one of this file's and from a run with the same settings; else
    one line saying why and what to do. map_location="cpu": the RNG state must stay a CPU
    tensor, and load_state_dict moves everything else to the model's device."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or a pickle that is not plain tensors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} cannot be loaded as a checkpoint ({reason}); delete it, or "
                         f"pass --no-resume to start over") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt) or (
            ckpt["method"] != METHOD):
        raise ValueError(f"{path} is not a checkpoint of {METHOD}.py; delete it, use another "
                         f"--out-dir, or pass --no-resume to start over")
    saved, now = flat_settings(ckpt["args"]), flat_settings(asdict(args))
    changed = [k for k in now if k.split(".")[0] not in RUN_ONLY and saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"--{k.replace('_', '-')} {now[k]} (checkpoint: {saved.get(k)})"
                          for k in changed)
        raise ValueError(f"{path} is from a run with other settings: {diffs}; resume with the "
                         f"checkpoint's settings, use another --out-dir, or pass --no-resume "
                         f"to discard it")
    return ckpt


def start_fresh(out_dir: str) -> None:
    """A new run in out_dir: the previous run's checkpoint, log and exports go."""
    for name in ("checkpoint.pt", "log.jsonl", "backbone.pt", "backbone.json", "curves.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def catch_preemption() -> dict:
    """SIGTERM and SIGUSR1 (what SLURM and other schedulers send before they kill a job) only
    set a flag: the training loop saves a checkpoint after the current step and stops."""
    caught = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda s, frame: caught.setdefault("signal", s))
    return caught


def agree(caught: dict, elapsed: float, device: torch.device) -> tuple[bool, float]:
    """Whether any process caught a signal, and the training time so far (the longest over the
    processes): under DDP every process takes the same learning rate and stops at the same
    step."""
    if not dist.is_initialized():
        return "signal" in caught, elapsed
    values = torch.tensor(["signal" in caught, elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)  # a small sync point, once per step
    return values[0].item() > 0, values[1].item()


def check_replicas(model: nn.Module) -> int:
    """Under DDP every process must hold the same weights: a desync is an error, not noise.
    Returns how many processes agreed."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP processes hold different weights: {digests}")
    return len(digests)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    for wanted, package in ((args.tensorboard, "tensorboard"), (args.wandb, "wandb")):
        if wanted and importlib.util.find_spec(package) is None:  # before anything slow
            raise ValueError(f"--{package} needs the {package} package: pip install {package}")
    device, rank, world = setup_processes(args)
    main_process, distributed = rank == 0, world > 1 or dist.is_initialized()
    local_batch = args.batch_size // world
    if args.batch_size % world or local_batch < 2:
        raise ValueError(f"--batch-size {args.batch_size} must split into {world} equal shares "
                         f"of at least 2 images")
    if args.order == "quasi_random" and distributed:
        raise ValueError("--order quasi_random is not available under torchrun (ffcv 1.0.2 has no "
                         "distributed quasi-random order); use --order random")
    if args.train_subset and args.train_subset // world < local_batch:
        raise ValueError(f"--train-subset {args.train_subset} is smaller than one batch "
                         f"({local_batch} images per process); raise it or lower --batch-size")
    for path in args.train_beton:
        check_labels(path, args.num_classes, unlabelled_ok=True)
    check_labels(args.val_beton, args.num_classes, unlabelled_ok=False)
    torch.manual_seed(args.seed)
    amp_dtype = autocast_dtype(args.precision, device)
    if device.type == "cuda":  # no effect before Ampere
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    resolution = args.resolution_schedule[1] if args.resolution_schedule else args.view1.resolution
    stem = resolve_stem(args.stem, resolution)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    resuming = args.resume and os.path.exists(ckpt_path)
    ckpt = load_checkpoint(ckpt_path, args) if resuming else None  # before anything slow
    sync_bn = distributed and args.sync_bn and device.type == "cuda"
    resolved = {"device": str(device), "world": world, "precision": PRECISION_NAMES[amp_dtype],
                "stem": stem, "sync_bn": sync_bn}
    if main_process:
        os.makedirs(args.out_dir, exist_ok=True)
        if not resuming:
            start_fresh(args.out_dir)
        print("python " + " ".join(sys.argv))
        print(json.dumps({**asdict(args), "resolved": resolved}, indent=1))
        save_provenance(args, resolved)
        if distributed and args.sync_bn and not sync_bn:
            print("note: SyncBatchNorm needs GPUs (torch has no CPU kernel for it): each CPU "
                  "process normalises over its own share of the batch")

    # Data
    indices = subset_indices(args.train_beton, args.train_subset, args.seed)

    def train_loader_at(size: int):  # --resolution-schedule: a new loader when the size changes
        views = [args.view1, args.view2]
        if args.resolution_schedule:
            views = [replace(view, resolution=size) for view in views]
        return make_ssl_loader(args.train_beton, views, local_batch, args.num_workers, args.seed,
                               distributed, device, indices=indices, order=args.order,
                               os_cache=args.os_cache)

    loader_size = epoch_resolution(args.resolution_schedule, resolution, 0)
    train_loader = train_loader_at(loader_size)
    val_loader = make_eval_loader(args.val_beton, resolution, 512, args.num_workers,
                                  distributed, device, os_cache=args.os_cache)

    # Model and optimisers
    model = VICReg(args, stem).to(device, memory_format=torch.channels_last)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ssl_params = nn.ModuleList([model.backbone, model.projector])
    peak_lr = args.base_lr * args.batch_size / 256
    optimizer = make_optimizer(args, ssl_params, peak_lr)
    probe_optimizer = torch.optim.AdamW(model.probe.parameters(), args.probe_lr)
    # fp16's narrow range: the loss is scaled up before backward (gradients would underflow to
    # 0), the gradients down before the step, which is skipped when they overflowed.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    budget_s, warmup = 60 * args.time_budget_min, args.warmup_epochs / args.epochs

    # Where to start: a checkpoint may be mid-epoch (its `batch` batches of that epoch are done).
    epoch, batch, step, sums, elapsed = 0, 0, 0, None, 0.0  # elapsed: seconds of training
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        probe_optimizer.load_state_dict(ckpt["probe_optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:  # empty when saved by a bf16 / fp32 run
            scaler.load_state_dict(ckpt["scaler"])
        epoch, batch, step, sums = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["sums"]
        sums = None if sums is None else sums.to(device)  # loaded onto the CPU, added to GPU sums
        elapsed = ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng"].cpu())  # a CPU tensor whatever map_location said
        if main_process:
            with open(log_path, "a") as f:  # forget what was logged after the checkpoint
                f.truncate(ckpt["log_bytes"])
            print(f"resumed from {ckpt_path} at epoch {epoch}, batch {batch} (step {step})")

    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if
                                                  device.type == "cuda" else None)
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
    wandb_run = None
    if args.wandb and main_process:
        import wandb

        run_id = hashlib.sha256(os.path.abspath(args.out_dir).encode()).hexdigest()[:16]
        wandb_run = wandb.init(project="jessl", name=f"{METHOD} {args.out_dir}", id=run_id,
                               dir=args.out_dir, config=asdict(args), resume="allow")

    def save(epoch: int, batch: int) -> None:
        if main_process:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "probe_optimizer": probe_optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch,
                         "batch": batch, "step": step, "sums": sums, "rng": torch.get_rng_state(),
                         "args": asdict(args), "method": METHOD, "elapsed": elapsed,
                         "log_bytes": os.path.getsize(log_path) if os.path.exists(log_path)
                         else 0}, ckpt_path)

    def log(record: dict) -> None:
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    caught, saved_at, stop, result = catch_preemption(), time.time(), False, {}
    spent = bool(budget_s) and elapsed >= budget_s  # the time budget is used up
    while epoch < args.epochs and not stop and not spent:
        size = epoch_resolution(args.resolution_schedule, resolution, epoch)
        if size != loader_size:  # same seeds: the same crops, at the new size
            loader_size, train_loader = size, train_loader_at(size)
        train_loader.next_epoch, train_loader.skip_batches = epoch, batch  # this epoch's order
        bar = tqdm(train_loader, desc=f"epoch {epoch}", total=steps_per_epoch, initial=batch,
                   disable=not main_process, leave=False)
        start, first_batch = time.time(), batch
        for x1, x2, y in bar:
            if batch == first_batch:  # the loader's start-up (pipeline compilation) is not
                tick = time.time()  # counted in the budget
            progress = elapsed / budget_s if budget_s else step / total_steps
            lr = learning_rate(progress, warmup, peak_lr)
            set_learning_rates(args, optimizer, lr)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, probe_loss, terms = net(x1, x2, y)
            optimizer.zero_grad(set_to_none=True)
            probe_optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss + probe_loss).backward()  # the scaler is a no-op without fp16
            scaler.step(optimizer)
            scaler.step(probe_optimizer)
            scaler.update()
            values = torch.stack([loss.detach(), *[t.detach() for t in terms.values()]]).float()
            sums = values if sums is None or batch == 0 else sums + values  # this epoch's
            batch, step = batch + 1, step + 1
            if step % 20 == 0:
                value = global_mean(loss.detach()).item()  # a CPU-GPU sync point: every 20 steps
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss is {value} at step {step}; lower --base-lr "
                        f"(the last good checkpoint, if any, is kept in {ckpt_path})")
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}")
                log({"step": step, "loss": value, "lr": lr})
            signalled, elapsed = agree(caught, elapsed + time.time() - tick, device)
            tick = time.time()
            spent = bool(budget_s) and elapsed >= budget_s  # ends the epoch (and the training)
            stop = bool(args.max_steps and step >= args.max_steps) or signalled
            due = 0 < args.checkpoint_every_min * 60 <= time.time() - saved_at
            if (stop or due) and batch < steps_per_epoch and not spent:  # epoch end saves
                save(epoch, batch)
                saved_at = tick = time.time()
            if stop or spent:
                break
        train_loader.close()  # an unfinished epoch's loading thread would keep its buffers
        if batch < steps_per_epoch and not spent:
            break  # stopped mid-epoch, checkpoint saved
        means = (global_mean(sums) / batch).tolist()  # loss, then each term
        epoch_loss, term_means = means[0], dict(zip(terms, means[1:]))
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"loss is {epoch_loss} in epoch {epoch}; lower --base-lr "
                                     f"(the last good checkpoint is kept in {ckpt_path})")
        images_per_s = (batch - first_batch) * args.batch_size / (time.time() - start)
        monitors = evaluate(model, val_loader, device, amp_dtype)
        replicas = check_replicas(model) if distributed else 1
        epochs_done = round(epoch + batch / steps_per_epoch, 4)  # < epoch + 1 if the budget ran out
        epoch, batch = epoch + 1, 0
        result = {"epoch": epochs_done, "step": step, "loss": epoch_loss, **term_means, "lr": lr,
                  "resolution": loader_size,
                  "images_per_s": images_per_s, **monitors, "train_min": elapsed / 60,
                  **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
                  "replicas_equal": replicas}
        if main_process:
            print(f"epoch {epochs_done:g}/{args.epochs} | loss {epoch_loss:.4f} | lr {lr:.4g} | "
                  f"{images_per_s:.0f} img/s | online probe {100 * monitors['probe_acc']:.2f}% | "
                  f"k-NN {100 * monitors['knn_acc']:.2f}% | RankMe {monitors['rankme']:.1f} | "
                  f"{elapsed / 60:.1f} min", flush=True)
            log(result)
            if writer:
                for key, value in result.items():
                    writer.add_scalar(key, value, step)
            if wandb_run:
                wandb_run.log(result, step=step)
        save(epoch, batch)
        saved_at = time.time()

    if main_process and "signal" in caught:
        print(f"caught signal {caught['signal']} at step {step}: checkpoint saved in {ckpt_path}; "
              f"run the same command to resume", flush=True)
    elif main_process:  # finished, or stopped by --max-steps
        # The backbone alone: torchvision's model (ScaledResNet for a --width other than 64) with
        # fc = Identity() and the stem described in backbone.json takes it with
        # load_state_dict(strict=True).
        save_atomic(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))
        with open(os.path.join(args.out_dir, "backbone.json"), "w") as f:
            json.dump({"arch": args.arch, "width": args.width,
                       "stem": stem_spec(model.backbone), "resolution": resolution,
                       "method": METHOD}, f)
    if main_process:
        if os.path.exists(log_path):
            plot_curves(log_path, os.path.join(args.out_dir, "curves.png"))
        if writer:
            writer.close()
        if wandb_run:
            wandb_run.finish()
    if distributed:
        dist.destroy_process_group()
    if "signal" in caught:
        raise SystemExit(128 + caught["signal"])
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
