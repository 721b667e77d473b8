"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.

Chen, Kornblith, Norouzi, Hinton, ICML 2020, https://arxiv.org/abs/2002.05709; single-GPU recipe
from Bordes, Balestriero, Vincent, "Towards Democratizing Joint-Embedding Self-Supervised
Learning", 2023, https://arxiv.org/abs/2303.01986 (batch 256, temperature 0.15, LARS lr 1.0).

    python write_beton.py                                  # data/fashion-mnist_{train,val}.beton
    python simclr.py --batch-size 256 --temperature 0.15   # one GPU
    torchrun --nproc-per-node 4 simclr.py                  # DDP: --batch-size is the global batch
    python probe.py --backbone runs/simclr/backbone.pt     # offline linear / MLP / k-NN probes

Killed or pre-empted? Run the same command again: it resumes exactly where the last checkpoint
(every epoch, every --checkpoint-every-min, and on SIGTERM / SIGUSR1) left it.

Measured (README; 2026-11-27, 2-core Xeon with AMX, bf16): the main job (`make demo`: this file
with the CPU recipe of benchmarks/bench_fashion_mnist.py: Fashion-MNIST at 28 px, ResNet-18 at
--width 32, batch 64, AdamW, 6 minutes = 3,009 steps) gives a linear probe of 84.1% top-1 against
79.3% +- 0.6 for three random inits of the same network (+4.8; MLP +3.9, k-NN +2.8).

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
                             RunConfig, ViewConfig, backbone_rules, check_data, check_replicas,
                             check_settings, epoch_resolution, evaluate, export_backbone, finish,
                             make_backbone, make_monitor_loader, make_ssl_loader, open_run,
                             parallel, probe_loss_of, resolve_stem, resume, save_checkpoint,
                             simclr_views, start_processes, subset_indices)

METHOD = "simclr"  # names the checkpoints, the exports and the plots


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
    projector_dims: tuple[int, ...] = (2048, 2048, 256)
    """Projector MLP widths after the backbone (none: no projector): hidden layers
    Linear-BN-ReLU, the last Linear without a bias followed by a BatchNorm without a shift, as
    SimCLR's official code (its ProjectionHead: the last LinearLayer has use_bias=False,
    use_bn=True)."""


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
    base_lr: float = 1.0
    """Peak learning rate = base_lr x batch_size / 256 (LARS; use ~0.001 for AdamW)."""
    weight_decay: float = 1e-6
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
    final_lr_ratio: float = 0.0
    """Where the cosine ends, as a fraction of the peak (SimCLR's official code decays to 0)."""
    probe_lr: float = 1e-3
    """Online linear probe (AdamW, its own optimiser)."""


@dataclass
class Loss:
    """NT-Xent."""

    temperature: float = 0.15
    """NT-Xent temperature tau."""


@dataclass
class Args:
    data: Annotated[DataConfig, NO_PREFIX] = field(default_factory=DataConfig)
    """The training and validation images (ffcv_ssl_common.DataConfig)."""
    view1: ViewConfig = field(default_factory=lambda: simclr_views(32)[0])
    """First view's augmentations: SimCLR's CIFAR-10 recipe (both views alike; colour strength
    0.5: jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2; no blur at 32 px). SimCLR's ImageNet
    recipe has colour strength 1.0 (0.8/0.8/0.8/0.2) and blur p=0.5; FFCV-SSL, whose single-GPU
    numbers this file's defaults follow, trained SimCLR with BYOL's asymmetric views
    (ffcv_ssl_common.byol_views: blur 1.0 / 0.1, solarization 0 / 0.2, saturation 0.2)."""
    view2: ViewConfig = field(default_factory=lambda: simclr_views(32)[1])
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
        default_factory=lambda: RunConfig(out_dir="runs/simclr"))
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
        ("--temperature", args.loss.temperature, args.loss.temperature >= 1e-4,
         ">= 0.0001 (0.1 to 0.5 is usual)")])
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


class SimCLR(nn.Module):
    def __init__(self, args: Args, stem: str):
        super().__init__()
        m = args.model
        self.backbone, width = make_backbone(m.arch, stem, m.zero_init_residual, m.width)
        self.projector = mlp((width, *m.projector_dims), last_bias=False, last_bn=True)
        self.probe = nn.Linear(width, args.data.num_classes)
        self.temperature = args.loss.temperature

    def forward(self, x1, x2, y):
        # Both views in one batch, as the official code: BatchNorm normalises over all 2B views.
        h1, h2 = self.backbone(torch.cat([x1, x2])).chunk(2)  # (B, width) each
        z1, z2 = self.projector(torch.cat([h1, h2])).float().chunk(2)
        # The loss in fp32: under bf16 autocast its matmuls and sums would run in bf16.
        with torch.autocast(x1.device.type, enabled=False):
            loss = nt_xent_loss(z1, z2, self.temperature)  # ALGO LOGIC
        # The probe sees features but sends no gradient into the backbone.
        probe_loss = probe_loss_of(self.probe(h1.detach()), y)
        return loss, probe_loss, {}  # {}: no separate loss terms to log


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1) averaged over all 2N anchors: for anchor i with positive j,
    -log exp(sim(i, j) / tau) / sum_{k != i} exp(sim(i, k) / tau), sim = cosine similarity.

    Under DDP the other views come from the global batch (all_gather keeps their gradients), so
    each process's loss is the mean over its own anchors and the mean over processes equals the
    single-process loss on the global batch.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        z1_all, z2_all = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
    else:
        z1_all, z2_all = z1, z2
    big_n = z1_all.shape[0]
    candidates = torch.cat([z1_all, z2_all])  # (2N, d): all views of the global batch
    anchors = torch.cat([z1, z2])  # (2n, d): this process's views
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    local = torch.arange(n, device=z1.device) + rank * n  # global index of our images
    self_idx = torch.cat([local, local + big_n])
    positive = torch.cat([local + big_n, local])
    logits[torch.arange(2 * n, device=z1.device), self_idx] = float("-inf")  # k != i
    return F.cross_entropy(logits, positive)


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
    for g in optimizer.param_groups:
        g["lr"] = lr


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
    model = SimCLR(args, stem).to(env.device, memory_format=torch.channels_last)
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
