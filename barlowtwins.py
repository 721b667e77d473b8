"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction.

Zbontar, Jing, Misra, LeCun, Deny, ICML 2021, https://arxiv.org/abs/2103.03230. Same skeleton as
simclr.py (`diff simclr.py barlowtwins.py` shows the method): the loss, a wide three-layer
projector, the BYOL augmentation recipe, and the paper's learning rates (0.2 for weights, 0.0048
for biases and BatchNorm parameters, x batch/256, LARS, weight decay 1.5e-6).

    python write_beton.py                                  # data/fashion-mnist_{train,val}.beton
    python barlowtwins.py --batch-size 256 --lambd 0.0051  # one GPU
    torchrun --nproc-per-node 4 barlowtwins.py             # DDP: --batch-size is the global batch
    python probe.py --backbone runs/barlowtwins/backbone.pt

Killed or pre-empted? Run the same command again: it resumes exactly where the last checkpoint
(every epoch, every --checkpoint-every-min, and on SIGTERM / SIGUSR1) left it.

Measured (README; 2026-11-27, 2-core Xeon with AMX, bf16): Fashion-MNIST at 28 px with the CPU
recipe of benchmarks/bench_fashion_mnist.py (ResNet-18 at --width 32; LARS at solo-learn's CIFAR
settings: lr 0.3, weight decay 1e-4, eta 0.02; batch 64, projector 1024-1024-1024), 10 minutes of
training (3,804 steps): linear probe 84.5% top-1 against 79.3% +- 0.6 for the same network with
random weights (three seeds): +5.3 (MLP +3.8, k-NN +2.3).

Everything no method changes (processes, precision, checkpoints, the clock, logging, monitors,
the backbone factory and its export, LARS) is in ffcv_ssl_common.py, Part 4; the data pipeline
and the augmentations are its Parts 2 and 3.
"""

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
import tyro

from ffcv_ssl_common import (LARS, NO_PREFIX, Clock, DataConfig, Logbook, NumericsConfig,
                             RunConfig, ViewConfig, backbone_rules, byol_views, check_data,
                             check_replicas, check_settings, epoch_resolution, evaluate,
                             export_backbone, finish, make_backbone, make_monitor_loader,
                             make_ssl_loader, open_run, parallel, probe_loss_of, resolve_stem,
                             resume, save_checkpoint, start_processes, subset_indices)

METHOD = "barlowtwins"  # names the checkpoints, the exports and the plots


@dataclass
class Model:
    """The encoder (a torchvision ResNet) and the projector."""

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
    """Projector MLP widths after the backbone (none: no projector): hidden layers
    Linear-BN-ReLU, last Linear (without a bias)."""


@dataclass
class Optim:
    """The optimiser and its schedule."""

    epochs: int = 100
    """Passes over the training set; the learning-rate schedule spans all of them (with
    --time-budget-min: the most epochs trained)."""
    time_budget_min: float = 0.0
    """Train for at most this many minutes of wall-clock (0: no limit): the schedule then runs
    over the budget, or over --epochs if they end first, so the run ends its schedule whichever
    limit binds; evaluation, checkpoints and the loader's start-up are not counted. The steps
    trained depend on the machine's speed: a budgeted run is not bit-reproducible (log.jsonl
    has each step's lr)."""
    batch_size: int = 256
    """Global batch (split over DDP processes)."""
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    """LARS as in the paper; SGD or AdamW (same parameter groups) to compare."""
    base_lr: float = 0.2
    """Peak learning rate of the weights = base_lr x batch_size / 256 (LARS)."""
    base_lr_biases: float = 0.0048
    """Peak learning rate of biases and BatchNorm parameters, scaled the same way."""
    weight_decay: float = 1.5e-6
    """Weight decay of the weights (biases and BatchNorm parameters get none)."""
    momentum: float = 0.9
    """Momentum of LARS and SGD."""
    lars_eta: float = 0.001
    """LARS trust coefficient: a step moves a weight tensor by lr x eta of its norm (before
    momentum). The ImageNet recipes' 0.001 suits their many thousand steps; short runs need more
    (solo-learn's CIFAR recipes: 0.02)."""
    warmup_epochs: float = 10
    """Linear warm-up, then cosine decay (with --time-budget-min: warm-up over the fraction
    warmup_epochs / epochs of the schedule)."""
    final_lr_ratio: float = 0.001
    """Where the cosine ends, as a fraction of the peak (as the official code: end_lr = 0.001 x
    base lr)."""
    probe_lr: float = 1e-3
    """Online linear probe (AdamW, its own optimiser)."""


@dataclass
class Loss:
    """Barlow Twins' redundancy reduction."""

    lambd: float = 0.0051
    """lambda: weight of the redundancy-reduction (off-diagonal) term."""


@dataclass
class Args:
    data: Annotated[DataConfig, NO_PREFIX] = field(default_factory=DataConfig)
    """The training and validation images (ffcv_ssl_common.DataConfig)."""
    view1: ViewConfig = field(default_factory=lambda: byol_views(32)[0])
    """First view's augmentations (BYOL recipe: blur 1.0, no solarization)."""
    view2: ViewConfig = field(default_factory=lambda: byol_views(32)[1])
    """Second view's augmentations."""
    model: Annotated[Model, NO_PREFIX] = field(default_factory=Model)
    """The encoder and the projector."""
    optim: Annotated[Optim, NO_PREFIX] = field(default_factory=Optim)
    """The optimiser and its schedule."""
    loss: Annotated[Loss, NO_PREFIX] = field(default_factory=Loss)
    """The loss."""
    numerics: Annotated[NumericsConfig, NO_PREFIX] = field(default_factory=NumericsConfig)
    """Seed and precision (ffcv_ssl_common.NumericsConfig)."""
    run: Annotated[RunConfig, NO_PREFIX] = field(
        default_factory=lambda: RunConfig(out_dir="runs/barlowtwins"))
    """Output, resume, devices and logging: a run may resume with other values of these."""


def validate(args: Args) -> None:
    """Every setting checked before anything slow: one line naming the flag and what it takes."""
    m, o = args.model, args.optim
    check_settings(backbone_rules(m.arch, m.width) + [  # (flag, value, allowed?, what is)
        ("--projector-dims", m.projector_dims, min(m.projector_dims, default=1) >= 1,
         "widths >= 1 (none: no projector, the loss on the backbone's features)"),
        ("--epochs", o.epochs, o.epochs >= 1, "an integer >= 1"),
        ("--time-budget-min", o.time_budget_min, o.time_budget_min >= 0,
         ">= 0 minutes (0: train --epochs epochs)"),
        ("--batch-size", o.batch_size, o.batch_size >= 2,
         "an integer >= 2 (BatchNorm and the loss compare images within the batch)"),
        ("--base-lr", o.base_lr, o.base_lr > 0, "> 0"),
        ("--weight-decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("--momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("--lars-eta", o.lars_eta, o.lars_eta > 0, "> 0"),
        ("--warmup-epochs", o.warmup_epochs, 0 <= o.warmup_epochs <= o.epochs, "in [0, --epochs]"),
        ("--final-lr-ratio", o.final_lr_ratio, 0 <= o.final_lr_ratio <= 1, "in [0, 1]"),
        ("--probe-lr", o.probe_lr, o.probe_lr > 0, "> 0"),
        # ALGO LOGIC: the method's own settings
        ("--base-lr-biases", o.base_lr_biases, o.base_lr_biases >= 0, ">= 0"),
        ("--lambd", args.loss.lambd, args.loss.lambd >= 0, ">= 0 (the paper: 0.0051)")])
    for part in (args.data, args.numerics, args.run):
        part.validate()
    args.view1.validate("--view1.")
    args.view2.validate("--view2.")
    if args.view2.resolution != args.view1.resolution:
        raise ValueError(f"--view2.resolution {args.view2.resolution} differs from "
                         f"--view1.resolution {args.view1.resolution}: the two views must have "
                         f"one size (they are batched together; evaluation and export use it)")


# ----------------------------------------------------------------------------------------------
# Model: backbone + projector (+ the online probe, trained on detached features).
# ----------------------------------------------------------------------------------------------
def mlp(dims: tuple[int, ...], last_bias: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU for each hidden width, then a Linear (with a bias if `last_bias`) and, with
    `last_bn`, a BatchNorm that scales but does not shift (SimCLR's official head)."""
    if len(dims) == 1:  # no widths: no projector (experiments/claim_projector.py's depth 0)
        return nn.Sequential()
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1]))
        layers[-1].register_parameter("bias", None)  # TF's BatchNormalization(center=False)
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    def __init__(self, args: Args, stem: str):
        super().__init__()
        m = args.model
        self.backbone, width = make_backbone(m.arch, stem, m.zero_init_residual, m.width)
        # No bias on the last layer (the official code): the loss standardises z.
        self.projector = mlp((width, *m.projector_dims), last_bias=False)
        self.probe = nn.Linear(width, args.data.num_classes)
        self.lambd = args.loss.lambd

    def forward(self, x1, x2, y):
        # Each view through the network alone (the official code): BatchNorm per view.
        h1, h2 = self.backbone(x1), self.backbone(x2)  # (B, width)
        z1, z2 = self.projector(h1).float(), self.projector(h2).float()
        # The loss in fp32: under bf16 autocast its matmuls and sums would run in bf16.
        with torch.autocast(x1.device.type, enabled=False):
            loss = barlow_twins_loss(z1, z2, self.lambd)  # ALGO LOGIC
        # The probe sees features but sends no gradient into the backbone.
        probe_loss = probe_loss_of(self.probe(h1.detach()), y)
        return loss, probe_loss, {}  # {}: no separate loss terms to log


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins (paper eq. 1): each embedding standardised along the batch (as BatchNorm
    without affine parameters), C = z1^T z2 / N,
    loss = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2.

    Under DDP the embeddings are gathered with their gradients and every process computes the
    loss of the global batch: statistics and C are those of the single-process computation, and
    so are the gradients (tests/test_ddp.py). The official code all-reduces C without autograd:
    its gradient is 1/W of the true one on W GPUs. LARS's trust ratio cancels that for the
    weights' step size, but not the gradient's balance with the weight decay, nor the biases'
    and BatchNorm's plain momentum steps: the paper's lr and weight decay, the defaults here,
    are tuned for gradients W times smaller than these.
    """
    if dist.is_initialized():
        z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
    n = z1.shape[0]
    z1 = F.batch_norm(z1, None, None, training=True)  # (N, D): zero mean, unit (biased) variance
    z2 = F.batch_norm(z2, None, None, training=True)
    c = z1.T @ z2 / n  # (D, D) cross-correlation
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def param_groups(model: nn.Module) -> list[dict]:
    """Weights (ndim > 1) get weight decay and LARS adaptation; biases and BN parameters don't."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights}, {"params": others, "weight_decay": 0.0, "lars_exclude": True}]


def make_optimizer(optim: Optim, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model)
    if optim.optimizer == "lars":
        return LARS(groups, lr, optim.weight_decay, optim.momentum, optim.lars_eta)
    for g in groups:
        g.pop("lars_exclude", None)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr, weight_decay=optim.weight_decay)


def learning_rate(progress: float, warmup: float, peak: float, final: float = 0.0) -> float:
    """`progress`: the fraction of the schedule done (Clock.progress). Linear warm-up from 0 to
    `peak` over the first `warmup` of it, then cosine decay to `final` x peak."""
    if progress < warmup:
        return peak * progress / warmup
    after = (progress - warmup) / max(1e-12, 1 - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, after)))
    return peak * (cosine + final * (1 - cosine))


def set_learning_rates(optim: Optim, optimizer: torch.optim.Optimizer, lr: float) -> None:
    optimizer.param_groups[0]["lr"] = lr  # weights, then biases and BN (param_groups())
    optimizer.param_groups[1]["lr"] = lr * optim.base_lr_biases / optim.base_lr


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    validate(args)
    env = start_processes(args.run, args.numerics, args.optim.batch_size)  # device, DDP, dtype
    check_data(args.data, env)
    schedule = args.data.resolution_schedule
    resolution = schedule[1] if schedule else args.view1.resolution  # evaluation and export
    stem = resolve_stem(args.model.stem, resolution)
    ckpt = open_run(args, METHOD, env, {"stem": stem})  # None: a new run; before anything slow

    # Data
    indices = subset_indices(args.data.train_beton, args.data.train_subset, args.numerics.seed)

    def train_loader_at(size: int):  # --resolution-schedule: a new loader when the size changes
        views = [args.view1, args.view2]
        if schedule:
            views = [replace(view, resolution=size) for view in views]
        return make_ssl_loader(args.data.train_beton, views, env.local_batch, args.run.num_workers,
                               args.numerics.seed, env.distributed, env.device, indices=indices,
                               order=args.data.order, os_cache=args.run.os_cache)

    loader_size = epoch_resolution(schedule, resolution, 0)
    train_loader = train_loader_at(loader_size)
    val_loader = make_monitor_loader(args.data.val_beton, resolution, env, args.run,
                                     args.data.eval_crop_ratio)

    # Model and optimisers
    model = BarlowTwins(args, stem).to(env.device, memory_format=torch.channels_last)
    if env.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    peak_lr = args.optim.base_lr * args.optim.batch_size / 256
    optimizer = make_optimizer(args.optim, nn.ModuleList([model.backbone, model.projector]),
                               peak_lr)
    probe_optimizer = torch.optim.AdamW(model.probe.parameters(), args.optim.probe_lr)
    # fp16's narrow range: the loss is scaled up before backward (gradients would underflow to
    # 0), the gradients down before the step, which is skipped when they overflowed.
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
    states = {"model": model, "optimizer": optimizer, "probe_optimizer": probe_optimizer,
              "scaler": scaler}  # what a checkpoint holds, with where the run is
    # Where to start: a checkpoint may be mid-epoch (its `batch` batches of that epoch are done).
    epoch, batch, step = resume(ckpt, states)
    net = parallel(model, env, args.run.compile)  # DDP under torchrun; --compile
    clock = Clock(args.optim.time_budget_min, args.run, env, ckpt)
    log = Logbook(args, METHOD, env, ckpt, args.optim.epochs)
    steps_per_epoch = len(train_loader)
    total_steps = args.optim.epochs * steps_per_epoch
    warmup = args.optim.warmup_epochs / args.optim.epochs  # a fraction of the schedule

    result, amp_dtype = {}, env.amp_dtype  # amp_dtype None: fp32
    while epoch < args.optim.epochs and not clock.stop and not clock.spent:
        size = epoch_resolution(schedule, resolution, epoch)
        if size != loader_size:  # same seeds: the same crops, at the new size
            loader_size, train_loader = size, train_loader_at(size)
        train_loader.next_epoch, train_loader.skip_batches = epoch, batch  # this epoch's order
        for x1, x2, y in log.epoch(train_loader, epoch, batch, steps_per_epoch):
            clock.start_step()  # training time runs from the batch's arrival
            lr = learning_rate(clock.progress(step / total_steps), warmup, peak_lr,
                               args.optim.final_lr_ratio)
            set_learning_rates(args.optim, optimizer, lr)
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, probe_loss, terms = net(x1, x2, y)
            optimizer.zero_grad(set_to_none=True)
            probe_optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss + probe_loss).backward()  # the scaler is a no-op without fp16
            scaler.step(optimizer)
            if train_loader.labelled:  # a batch of an unlabelled file leaves the probe alone
                scaler.step(probe_optimizer)
            scaler.update()
            batch, step = batch + 1, step + 1
            log.step(step, loss, terms, lr)  # every 20 steps: a log line, a NaN check
            if clock.end_step(step) and batch < steps_per_epoch:  # signal, interval, max steps
                save_checkpoint(args, METHOD, env, states, (epoch, batch, step), clock, log)
            if clock.stop or clock.spent:
                break
        train_loader.close()  # an unfinished epoch's loading thread would keep its buffers
        if batch < steps_per_epoch and not clock.spent:
            break  # stopped mid-epoch, checkpoint saved
        losses = log.end_epoch(epoch, batch)  # the epoch's mean loss (and terms), images/s
        epochs_done = round(epoch + batch / steps_per_epoch, 4)  # < epoch + 1 if the budget ran out
        epoch, batch = epoch + 1, 0
        result = log.record({
            "epoch": epochs_done, "step": step, **losses, "lr": lr, "resolution": loader_size,
            **evaluate(model, val_loader, env), "train_min": clock.elapsed / 60,
            **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
            "replicas_equal": check_replicas(model, env)})
        save_checkpoint(args, METHOD, env, states, (epoch, batch, step), clock, log)

    if not clock.signal:  # finished, or stopped by --max-steps: the backbone for probe.py
        export_backbone(model.backbone, args.run.out_dir, args.model.arch, args.model.width,
                        resolution, args.data.eval_crop_ratio, METHOD, env)
    log.close()  # curves.png; TensorBoard, wandb
    finish(env, clock, step)  # after a signal: exit status 128 + signal, to be resumed
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (OSError, ValueError, FloatingPointError) as err:  # one line, no traceback
        sys.exit(f"error: {err}")
