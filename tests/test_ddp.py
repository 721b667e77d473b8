"""Each method's model under DDP (two gloo processes on the CPU, each with half of the global
batch) computes the gradients one process computes on the whole batch: the gathered views keep
their gradient, DDP averages (not sums) over the processes, and the online probe too. BatchNorm
is in eval mode (per-image, so the shares are independent); instance SimCLR without noise."""

import os
import socket

import pytest
import torch
import torch.nn as nn

import ffcv_ssl_common as C

METHODS = {"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "vicreg": "VICReg",
           "instance_simclr": "InstanceSimCLR"}
N = 8  # the global batch


def model_of(name):
    import importlib

    m = importlib.import_module(name)
    extra = {"noise_std": 0.0, "in_batch_negatives": True} if name == "instance_simclr" else {}
    args = C.with_settings(m.Args(), width=16, projector_dims=(32, 16), **extra)
    torch.manual_seed(0)
    model = getattr(m, METHODS[name])(args, "small")
    with torch.no_grad():  # a trained-looking network: no block starts as the identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    x1, x2, neg = (torch.randn(N, 3, 12, 12, generator=g) for _ in range(3))
    return x1, x2, neg, torch.arange(N) % 10


def gradients(name, model, x1, x2, neg, y):
    net = model
    if torch.distributed.is_initialized():
        net = nn.parallel.DistributedDataParallel(model)
    args = (x1, x2, [neg], y, 0) if name == "instance_simclr" else (x1, x2, y)
    loss, probe_loss, _ = net(*args)
    (loss + probe_loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    share = slice(rank * N // world, (rank + 1) * N // world)
    for name in METHODS:
        out[(name, rank)] = gradients(name, model_of(name), *(t[share] for t in batch()))
    dist.destroy_process_group()


def test_ddp_gradients_equal_one_process_on_the_global_batch():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    for name in METHODS:
        alone = gradients(name, model_of(name), *batch())
        assert len(alone) > 20  # backbone, projector and probe
        for rank in (0, 1):
            ddp = out[(name, rank)]
            assert ddp.keys() == alone.keys()
            for key, grad in alone.items():
                scale = grad.abs().max().clamp(min=1e-8)
                torch.testing.assert_close(ddp[key] / scale, grad / scale, rtol=0, atol=2e-4,
                                           msg=f"{name} {key} (rank {rank})")


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_that_are_summed_or_lost_would_be_seen(name):
    """The comparison above can fail: twice the gradient (summed over two processes instead
    of averaged), or the gathered views' gradient dropped, gives other numbers."""
    alone = gradients(name, model_of(name), *batch())
    half = gradients(name, model_of(name), *(t[:N // 2] for t in batch()))
    key = "backbone.layer1.0.conv1.weight"
    assert not torch.allclose(2 * alone[key], alone[key], atol=1e-6)
    assert not torch.allclose(half[key], alone[key], rtol=1e-3, atol=1e-6)
