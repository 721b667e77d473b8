"""Instance SimCLR: SimCLR whose negatives are other patches of the same image.

Bordes, Balestriero, Vincent, "Towards Democratizing Joint-Embedding Self-Supervised Learning",
2023, https://arxiv.org/abs/2303.01986: SimCLR still learns "while using a single image patch as
negative example, and simple Gaussian noise as the only data augmentation for the positive pair".
Same skeleton as simclr.py (`diff simclr.py instance_simclr.py` shows the method): for every image
a patch A, two copies of it with independent Gaussian noise (the positives), and K other patches of
the same size from the same image, not overlapping A where the image allows (the negatives, with
their own noise). Each image's InfoNCE sees only its own K negatives, never the other images.

    python write_beton.py                                       # data/fashion-mnist_*.beton
    python instance_simclr.py --num-negatives 1 --noise-std 0.1
    python instance_simclr.py --recipe simclr                   # SimCLR's augmentations back
    python instance_simclr.py --in-batch-negatives              # + the other images (SimCLR's)
    torchrun --nproc-per-node 4 instance_simclr.py              # DDP: --batch-size is global
    python probe.py --backbone runs/instance_simclr/backbone.pt

Killed or pre-empted? Run the same command again: it resumes exactly where the last checkpoint
(every epoch, every --checkpoint-every-min, and on SIGTERM / SIGUSR1) left it.

Measured (README; 2026-11-27, 2-core Xeon with AMX, bf16): Fashion-MNIST at 28 px with the CPU
recipe of benchmarks/bench_fashion_mnist.py (ResNet-18 at --width 32, batch 128, this file's LARS
settings and noise), 10 minutes of training (1,773 steps): linear probe 82.6% top-1 against 79.3%
+- 0.6 for the same network with random weights (three seeds): +3.3 (MLP +3.1, k-NN +2.4).

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

from ffcv_ssl_common import (IMAGENET_STD, LARS, NO_PREFIX, Clock, DataConfig, Logbook,
                             NumericsConfig, RunConfig, ViewConfig, backbone_rules, check_data,
                             check_replicas, check_settings, epoch_resolution, evaluate,
                             export_backbone, finish, make_backbone, make_monitor_loader,
                             make_ssl_loader, open_run, parallel, probe_loss_of, resolve_stem,
                             resume, save_checkpoint, simclr_views, start_processes,
                             subset_indices)

METHOD = "instance_simclr"  # names the checkpoints, the exports and the plots


@dataclass
class Patches:
    """The patches and their noise: the positives and the negatives."""

    resolution: int = 32
    """Side of every patch after resizing, in pixels."""
    patch_scale: tuple[float, float] = (0.08, 0.25)
    """Range of a patch's area as a fraction of the image (A's; the negatives take A's size)."""
    patch_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of a patch's aspect ratio, sampled log-uniformly."""
    num_negatives: int = 1
    """K: negative patches per image, each from the same image as its positives."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise on every patch, in [0, 1] image units: zero-mean
    and not clipped (added to the normalised patches on the device, as additive noise is in the
    paper), so a black background gets darker as often as lighter."""
    recipe: Literal["noise", "simclr"] = "noise"
    """noise: the noise is the only augmentation (the paper's experiment); simclr: each patch
    also gets SimCLR's flip, colour jitter and grayscale (the positives still share patch A)."""


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
    """InfoNCE against the image's own patches."""

    temperature: float = 0.15
    """InfoNCE temperature tau."""
    in_batch_negatives: bool = False
    """Also use the batch's other images as negatives, as SimCLR does."""


@dataclass
class Args:
    data: Annotated[DataConfig, NO_PREFIX] = field(default_factory=DataConfig)
    """The training and validation images (ffcv_ssl_common.DataConfig)."""
    patches: Annotated[Patches, NO_PREFIX] = field(default_factory=Patches)
    """The patches: instance SimCLR's views."""
    model: Annotated[Model, NO_PREFIX] = field(default_factory=Model)
    """The encoder and the projector."""
    optim: Annotated[Optim, NO_PREFIX] = field(default_factory=Optim)
    """The optimiser and its schedule."""
    loss: Annotated[Loss, NO_PREFIX] = field(default_factory=Loss)
    """The loss."""
    numerics: Annotated[NumericsConfig, NO_PREFIX] = field(default_factory=NumericsConfig)
    """Seed and precision (ffcv_ssl_common.NumericsConfig)."""
    run: Annotated[RunConfig, NO_PREFIX] = field(
        default_factory=lambda: RunConfig(out_dir="runs/instance_simclr"))
    """Output, resume, devices and logging: a run may resume with other values of these."""


def validate(args: Args) -> None:
    """Every setting checked before anything slow: one line naming the flag and what it takes."""
    m, o, p = args.model, args.optim, args.patches
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
         ">= 0.0001 (0.1 to 0.5 is usual)"),
        ("--num-negatives", p.num_negatives, p.num_negatives >= 1,
         "an integer >= 1 (negative patches per image)"),
        ("--resolution", p.resolution, 1 <= p.resolution <= 4096, "an integer in 1..4096"),
        ("--patch-scale", p.patch_scale, 0 < p.patch_scale[0] <= p.patch_scale[1] <= 1,
         "two fractions 0 < min <= max <= 1"),
        ("--patch-ratio", p.patch_ratio, 0 < p.patch_ratio[0] <= p.patch_ratio[1],
         "two ratios 0 < min <= max"),
        ("--noise-std", p.noise_std, p.noise_std >= 0, ">= 0 (in [0, 1] image units)")])
    for part in (args.data, args.numerics, args.run):
        part.validate()


# ----------------------------------------------------------------------------------------------
# Patches: the only augmentation is the noise (unless --recipe simclr)
# ----------------------------------------------------------------------------------------------
def patch_view(patches: Patches) -> ViewConfig:
    """What every patch (the positives' copies and the negatives) goes through after its crop."""
    view = ViewConfig(resolution=patches.resolution, crop_scale=patches.patch_scale,
                      crop_ratio=patches.patch_ratio, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    if patches.recipe == "simclr":
        view = replace(simclr_views(patches.resolution)[0], crop_scale=patches.patch_scale,
                       crop_ratio=patches.patch_ratio)
    return view  # the noise is added on the device: InstanceSimCLR.add_noise


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


class InstanceSimCLR(nn.Module):
    def __init__(self, args: Args, stem: str):
        super().__init__()
        m = args.model
        self.backbone, width = make_backbone(m.arch, stem, m.zero_init_residual, m.width)
        self.projector = mlp((width, *m.projector_dims), last_bias=False, last_bn=True)
        self.probe = nn.Linear(width, args.data.num_classes)
        self.temperature, self.in_batch = args.loss.temperature, args.loss.in_batch_negatives
        # The noise, in normalised units per channel (the loader divides by IMAGENET_STD / 255).
        self.register_buffer("noise_std", torch.tensor(
            args.patches.noise_std * 255 / IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        # Forward passes so far (saved with the model). The noise is drawn from the step number
        # the loop passes instead: reading this CUDA tensor would wait for the GPU every step.
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.seed = args.numerics.seed

    def add_noise(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """x + N(0, noise_std^2), its own draw for every pixel, copy, step and DDP process: a
        generator seeded with (seed, step, rank) makes it reproducible on resume."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = torch.Generator(x.device).manual_seed(hash((self.seed, step, rank)) % 2**63)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        return (x.float() + noise * self.noise_std).to(x.dtype)

    def forward(self, x1, x2, negatives, y, step: int):
        """x1, x2: patch A twice (B, 3, R, R); negatives: K such batches; step: the steps done
        before this one (the noise's stream)."""
        # Every view in one batch (as SimCLR's official code): BatchNorm over all (2 + K) B.
        self.calls += 1
        x = self.add_noise(torch.cat([x1, x2, *negatives]), step + 1)
        h = self.backbone(x)
        z = self.projector(h).float().view(2 + len(negatives), len(x1), -1)  # (2 + K, B, d)
        h1, z1, z2, zn = h[:len(x1)], z[0], z[1], z[2:].transpose(0, 1)  # zn: (B, K, d)
        # The loss in fp32: under bf16 autocast its matmuls and sums would run in bf16.
        with torch.autocast(x1.device.type, enabled=False):
            loss = instance_nt_xent_loss(z1, z2, zn, self.temperature, self.in_batch)  # ALGO LOGIC
        # The probe sees features but sends no gradient into the backbone.
        probe_loss = probe_loss_of(self.probe(h1.detach()), y)
        return loss, probe_loss, {}  # {}: no separate loss terms to log


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def instance_nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, z_neg: torch.Tensor,
                          temperature: float, in_batch: bool = False) -> torch.Tensor:
    """InfoNCE of each image against its own negatives, averaged over all 2N anchors.

    z1, z2: (N, d) the two noisy copies of each image's patch A; z_neg: (N, K, d) the K other
    patches of the same image. Anchor z1[i] has positive z2[i] (and z2[i] has z1[i]), and its
    negatives are z_neg[i, :] only: loss_i = -log exp(s(i, +) / tau) / (exp(s(i, +) / tau) +
    sum_k exp(s(i, neg_k) / tau)), s = cosine similarity. With `in_batch`, every view of the
    other images (SimCLR's negatives, the global batch under DDP) joins the denominator.
    Without it each term involves one image only: under DDP the mean over a process's anchors,
    averaged over processes by DDP, is the global mean, with nothing to gather.
    """
    z1, z2, z_neg = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), F.normalize(z_neg, dim=-1)
    n = z1.shape[0]
    anchors, positives = torch.cat([z1, z2]), torch.cat([z2, z1])  # (2n, d)
    own_negatives = torch.cat([z_neg, z_neg])  # (2n, K, d)
    logits = [(anchors * positives).sum(1, keepdim=True),  # column 0: the positive
              torch.einsum("nd,nkd->nk", anchors, own_negatives)]
    if in_batch:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            z1_all, z2_all = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
        else:
            z1_all, z2_all = z1, z2
        big_n = z1_all.shape[0]
        others = anchors @ torch.cat([z1_all, z2_all]).T  # (2n, 2N)
        local = torch.arange(n, device=z1.device) + rank * n  # global index of our images
        rows = torch.arange(2 * n, device=z1.device)
        others[rows, torch.cat([local, local + big_n])] = float("-inf")  # the anchor itself
        others[rows, torch.cat([local + big_n, local])] = float("-inf")  # its positive: column 0
        logits.append(others)
    logits = torch.cat(logits, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long, device=z1.device))


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
    resolution = schedule[1] if schedule else args.patches.resolution  # evaluation and export
    stem = resolve_stem(args.model.stem, resolution)
    ckpt = open_run(args, METHOD, env, {"stem": stem})  # None: a new run; before anything slow

    # Data
    indices = subset_indices(args.data.train_beton, args.data.train_subset, args.numerics.seed)

    def train_loader_at(size: int):  # --resolution-schedule: a new loader when the size changes
        patch = replace(patch_view(args.patches), resolution=size)
        # Two copies of one crop (A), then K negative patches of the same image, each with its
        # own noise.
        return make_ssl_loader(args.data.train_beton, [patch, patch], env.local_batch,
                               args.run.num_workers, args.numerics.seed, env.distributed,
                               env.device, shared_crop=True, indices=indices,
                               negatives=[patch] * args.patches.num_negatives,
                               order=args.data.order, os_cache=args.run.os_cache)

    loader_size = epoch_resolution(schedule, resolution, 0)
    train_loader = train_loader_at(loader_size)
    val_loader = make_monitor_loader(args.data.val_beton, resolution, env, args.run,
                                     args.data.eval_crop_ratio)

    # Model and optimisers
    model = InstanceSimCLR(args, stem).to(env.device, memory_format=torch.channels_last)
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
        for x1, x2, *negatives, y in log.epoch(train_loader, epoch, batch, steps_per_epoch):
            clock.start_step()  # training time runs from the batch's arrival
            lr = learning_rate(clock.progress(step / total_steps), warmup, peak_lr,
                               args.optim.final_lr_ratio)
            set_learning_rates(args.optim, optimizer, lr)
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, probe_loss, terms = net(x1, x2, negatives, y, step)
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
