"""GPU check of the method files' device paths, for a machine with CUDA but without ffcv.

    python tools/gpu_check.py            # prints one line per check, exits non-zero on a failure

ffcv (a compiled extension) and tyro are replaced by stubs, so the four method files import
without them: the loaders are not exercised here (they run on the CPU in the test suite); the
models, losses, optimisers, monitors and checkpoints are, on CUDA, with bf16 autocast and
channels_last, against the same computation on the CPU in fp32.
"""

import os
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _Meta(type):
    def __getattr__(cls, name):
        return _Stub


class _Stub(metaclass=_Meta):
    def __init__(self, *args, **kwargs):
        pass


def _stub_module(name):
    module = types.ModuleType(name)
    def attribute(attr):
        if attr.startswith("__"):  # __file__ etc.: what inspect asks every module
            raise AttributeError(attr)
        return {"IMAGE_MODES": {}, "IS_CUDA": True}.get(attr, _Stub)

    module.__getattr__ = attribute
    module.__path__ = []
    sys.modules[name] = module


for name in ("ffcv", "ffcv.fields", "ffcv.fields.basics", "ffcv.fields.rgb_image", "ffcv.libffcv",
             "ffcv.loader", "ffcv.loader.epoch_iterator", "ffcv.pipeline",
             "ffcv.pipeline.allocation_query", "ffcv.pipeline.compiler",
             "ffcv.pipeline.operation", "ffcv.reader", "ffcv.transforms", "ffcv.writer", "tyro"):
    try:
        __import__(name)
    except ImportError:
        _stub_module(name)

import barlowtwins  # noqa: E402
import ffcv_ssl_common as C  # noqa: E402
import instance_simclr  # noqa: E402
import simclr  # noqa: E402
import vicreg  # noqa: E402

FAILED = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def batch(device, n=64, side=28, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, side, side, generator=gen)
    x2 = torch.randn(n, 3, side, side, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    cl = torch.channels_last
    return (x1.to(device, memory_format=cl, non_blocking=True),
            x2.to(device, memory_format=cl, non_blocking=True), y.to(device))


def model_of(module, stem="small", **kw):
    cls = {"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "vicreg": "VICReg",
           "instance_simclr": "InstanceSimCLR"}[module.METHOD]
    torch.manual_seed(0)
    args = C.with_settings(module.Args(), projector_dims=(256, 128), **kw)
    return getattr(module, cls)(args, stem), args


def forward(module, model, x1, x2, y, bf16=False, dtype=None):
    dtype = torch.bfloat16 if bf16 else dtype
    with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype is not None):
        if module is instance_simclr:
            return model(x1, x2, [x2.flip(3)], y, 0)
        return model(x1, x2, y)


def main():
    dry = os.environ.get("GPU_CHECK_DRY_RUN") == "1"  # the script's own logic, on the CPU
    assert dry or torch.cuda.is_available(), "no CUDA device"
    cuda, cpu = torch.device("cpu" if dry else "cuda"), torch.device("cpu")
    print("dry run on the CPU" if dry else torch.cuda.get_device_name(), "torch",
          torch.__version__, flush=True)
    check("bf16_is_fast(cuda)", dry or C.bf16_is_fast(cuda))
    check("--precision auto on this GPU: bf16", dry or C.autocast_dtype("auto", cuda)
          is torch.bfloat16)
    for module in (simclr, barlowtwins, vicreg, instance_simclr):
        name = module.METHOD
        # fp32 on CUDA (TF32 off) against fp32 on the CPU: the same loss, the same gradients.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        ref, _ = model_of(module)
        gpu, args = model_of(module)
        gpu = gpu.to(cuda, memory_format=torch.channels_last)
        xs = batch(cpu)
        loss_cpu, probe_cpu, _ = forward(module, ref, *xs, bf16=False)
        loss_gpu, probe_gpu, _ = forward(module, gpu, *batch(cuda), bf16=False)
        (loss_cpu + probe_cpu).backward()
        (loss_gpu + probe_gpu).backward()
        noisy = name == "instance_simclr"  # its noise is drawn on each device: losses differ
        same = torch.allclose(loss_cpu, loss_gpu.cpu(), rtol=1e-3, atol=1e-4)
        check(f"{name}: fp32 loss cuda == cpu", same or noisy,
              f"{loss_cpu.item():.5f} vs {loss_gpu.item():.5f}"
              + (" (instance: noise drawn on each device differs)" if noisy else ""))
        if name != "instance_simclr":
            g_cpu = ref.backbone.conv1.weight.grad
            g_gpu = gpu.backbone.conv1.weight.grad.cpu()
            rel = ((g_cpu - g_gpu).norm() / g_cpu.norm()).item()
            check(f"{name}: fp32 gradients cuda == cpu", rel < 1e-3,
                  f"relative difference {rel:.2e}")
        # bf16 autocast: the network in bf16, the loss in fp32, a few optimiser steps lower it.
        model, args = model_of(module)
        model = model.to(cuda, memory_format=torch.channels_last)
        opt = module.make_optimizer(module.Optim(optimizer="lars"), nn_list(module, model), 0.3)
        losses = []
        fixed = batch(cuda, n=128, seed=1)
        for _ in range(8):
            loss, probe_loss, _ = forward(module, model, *fixed, bf16=True)
            check_dtype = loss.dtype == torch.float32
            opt.zero_grad(set_to_none=True)
            (loss + probe_loss).backward()
            opt.step()
            losses.append(loss.item())
        check(f"{name}: bf16 autocast, LARS: loss fp32 and finite", check_dtype and all(
            map(lambda v: v == v and abs(v) < 1e6, losses)), f"{losses[0]:.4f} -> {losses[-1]:.4f}")
        # Monitors on CUDA tensors: k-NN and RankMe as on the CPU.
        loader = [(xs[0].to(cuda, memory_format=torch.channels_last), xs[2].to(cuda))
                  for xs in (batch(cpu, n=100, seed=s) for s in range(3))]
        mon = C.evaluate(model, loader, C.Env(cuda, 0, 1, 64, torch.bfloat16, False))
        feats = torch.cat([model.eval().backbone(x).float() for x, _ in loader]).detach()
        model.train()
        labels = torch.cat([y for _, y in loader])
        knn_cpu = C.knn_leave_one_out(feats.cpu(), labels.cpu())
        check(f"{name}: evaluate() on cuda",
              0 <= mon["probe_acc"] <= 1 and 1 <= mon["rankme"] <= 300, f"{mon}")
        check(f"{name}: k-NN on cuda == on cpu", abs(C.knn_leave_one_out(feats, labels)
                                                    - knn_cpu) <= 2 / 300)
        # Checkpoint: saved from CUDA, loaded with map_location="cpu" (weights_only), back on CUDA.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "checkpoint.pt")
            C.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "rng": torch.get_rng_state()},
                               path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            again, _ = model_of(module)
            again = again.to(cuda, memory_format=torch.channels_last)
            again.load_state_dict(ckpt["model"])
            opt2 = module.make_optimizer(module.Optim(optimizer="lars"), nn_list(module, again), 0.3)
            opt2.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"].cpu())
            same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                         again.state_dict().values()))
            state_device = next(iter(opt2.state.values()))["mu"].device
            check(f"{name}: checkpoint cuda -> cpu file -> cuda",
                  same and state_device.type == cuda.type, f"optimizer state on {state_device}")
    # fp16 autocast with a gradient scaler (GPUs before Ampere), LARS; the scaler's state
    # through a checkpoint file.
    for module in (simclr, barlowtwins):
        model, _ = model_of(module)
        model = model.to(cuda, memory_format=torch.channels_last)
        opt = module.make_optimizer(module.Optim(optimizer="lars"), nn_list(module, model), 0.3)
        scaler = torch.amp.GradScaler(cuda.type)
        # (the CPU emulates fp16 convolutions' backward, ~1 s per image: a small dry-run batch)
        fixed, losses = batch(cuda, n=8 if dry else 128, seed=1), []
        for _ in range(8):
            loss, probe_loss, _ = forward(module, model, *fixed, dtype=torch.float16)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss + probe_loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        with tempfile.TemporaryDirectory() as d:
            C.save_atomic({"scaler": scaler.state_dict()}, os.path.join(d, "c.pt"))
            again = torch.amp.GradScaler(cuda.type)
            again.load_state_dict(torch.load(os.path.join(d, "c.pt"), weights_only=True)["scaler"])
        check(f"{module.METHOD}: fp16 autocast + GradScaler, LARS: finite, lower, scaler saved",
              all(v == v and abs(v) < 1e6 for v in losses) and losses[-1] < losses[0]
              and again.get_scale() == scaler.get_scale(),
              f"{losses[0]:.4f} -> {losses[-1]:.4f}, scale {scaler.get_scale():g}")
    # probe.py's heads and k-NN on the device: as on the CPU.
    import probe

    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, 64, generator=gen)
    ys = torch.randint(0, 10, (3000,), generator=gen)
    xs_ = centres[ys] + 12 * torch.randn(3000, 64, generator=gen)  # overlapping classes
    pargs = probe.Args()
    accs = {}
    for dev in (cpu, cuda):
        fx, fy, vx, vy = (t.to(dev) for t in (xs_[:2000], ys[:2000], xs_[2000:], ys[2000:]))

        def batches(fx=fx, fy=fy):
            for idx in torch.randperm(2000, generator=gen).to(dev).split(256):
                yield fx[idx], fy[idx]
        accs[dev.type] = (probe.train_head("linear", pargs, 64, batches, vx, vy, 8, 1e-2, 5e-4)
                          ["top1"], probe.knn(fx, fy, vx, vy, 20, 0.07, 10)["top1"])
    check("probe.py: linear head and k-NN on cuda as on cpu",
          abs(accs["cpu"][0] - accs[cuda.type][0]) < 0.03
          and abs(accs["cpu"][1] - accs[cuda.type][1]) < 1.5e-3, f"{accs}")  # 1 of 1000 images
    # Instance SimCLR's noise drawn on the GPU: zero-mean, the asked std, reproducible.
    model, _ = model_of(instance_simclr, noise_std=0.1)
    model = model.to(cuda)
    x = torch.zeros(64, 3, 32, 32, device=cuda)
    a, b = model.add_noise(x), model.add_noise(x)
    grey = a * model.noise_std.new_tensor(instance_simclr.IMAGENET_STD).view(1, 3, 1, 1)
    check("instance: cuda noise zero-mean, std 25.5 grey levels, reproducible",
          abs(grey.mean().item()) < 0.2 and abs(grey.std().item() - 25.5) < 0.3
          and torch.equal(a, b),
          f"mean {grey.mean().item():.3f} std {grey.std().item():.2f}")
    # Throughput of the training step (channels_last), ResNet-18 small stem at 28 px: bf16, fp16,
    # fp32 with TF32 (the method files' default) and without.
    for stem, n, dtype, tf32 in (("small", 256, torch.bfloat16, True),
                                 ("small-stride2", 256, torch.bfloat16, True),
                                 ("small", 256, torch.float16, True), ("small", 256, None, True),
                                 ("small", 256, None, False)):
        if dry and dtype is torch.float16:
            continue
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        scaler = torch.amp.GradScaler(cuda.type, enabled=dtype is torch.float16)
        model, args = model_of(simclr, stem=stem)
        model = model.to(cuda, memory_format=torch.channels_last)
        opt = simclr.make_optimizer(simclr.Optim(optimizer="lars"), nn_list(simclr, model), 0.3)
        xs = batch(cuda, n=n)
        for i in range(7 if dry else 25):
            if i == 5:
                if not dry:
                    torch.cuda.synchronize()
                start = time.time()
            loss, probe_loss, _ = forward(simclr, model, *xs, dtype=dtype)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss + probe_loss).backward()
            scaler.step(opt)
            scaler.update()
        if not dry:
            torch.cuda.synchronize()
        step = (time.time() - start) / (2 if dry else 20)
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
        name += " (TF32)" if dtype is None and tf32 else ""
        print(f"info SimCLR step, ResNet-18 {stem} stem, 28 px, batch {n}, {name}: "
              f"{1000 * step:.1f} ms = {n / step:.0f} images/s", flush=True)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all GPU checks passed")
    sys.exit(1 if FAILED else 0)


def nn_list(module, model):
    return torch.nn.ModuleList([model.backbone, model.projector])


if __name__ == "__main__":
    main()
