"""The run infrastructure of ffcv_ssl_common.py (Part 4) that every method file's loop calls, in
process and without training: the clock (with a fake time source), the logbook, checkpoints and
their settings check, settings groups, the backbone factory and its export contract, LARS,
precision, the monitors, and the seed streams of the augmentations."""

import json
import math
import os
import re
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ffcv_ssl_common as C
import simclr

# /proc/cpuinfo flags of three real CPUs: an AVX2-only EPYC (Zen 3, this project's build machine,
# where bf16 autocast ran 12x slower than fp32), a Zen 4 EPYC and a Sapphire Rapids Xeon.
ZEN3 = "fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq rdpid fsrm"
ZEN4 = ZEN3 + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512vnni"
SPR = "fpu sse2 avx2 avx512f avx512bw avx512_fp16 amx_bf16 amx_tile amx_int8"


class FakeTime:
    """time.time() for ffcv_ssl_common: advanced by hand, so the clock's tests take no seconds."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(C, "time", fake)
    return fake


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


ENV = C.Env(torch.device("cpu"), rank=0, world=1, local_batch=8, amp_dtype=None, sync_bn=False)


def clock(budget_min=0.0, every_min=0.0, max_steps=0, ckpt=None, out_dir="unused"):
    run = C.RunConfig(out_dir=out_dir, checkpoint_every_min=every_min, max_steps=max_steps)
    return C.Clock(budget_min, run, ENV, ckpt)


def steps(c, first, count, seconds, wait=0.0, fake=None):
    """`count` steps of `seconds` each, numbered from `first`, after `wait` seconds for the first
    batch; returns what end_step answered for each."""
    answers = []
    fake.now += wait
    for step in range(first, first + count):
        c.start_step()
        fake.now += seconds
        answers.append(c.end_step(step))
    return answers


def test_clock_counts_steps_not_the_wait_for_the_first_batch_nor_checkpoints(fake_time,
                                                                           restore_signals):
    c = clock(budget_min=1.0)
    steps(c, 1, 10, seconds=2.0, wait=30.0, fake=fake_time)  # 30 s of pipeline compilation
    assert c.elapsed == pytest.approx(20.0) and c.progress(0.1) == pytest.approx(20 / 60)
    c.saved()
    fake_time.now += 5.0  # saving, evaluating, the next epoch's first batch: not training
    steps(c, 11, 5, seconds=2.0, fake=fake_time)
    assert c.elapsed == pytest.approx(30.0) and not c.spent
    steps(c, 16, 15, seconds=2.0, fake=fake_time)
    assert c.elapsed == pytest.approx(60.0) and c.spent and not c.stop


def test_the_schedule_ends_with_whichever_limit_binds_first(fake_time, restore_signals):
    """With --time-budget-min the schedule follows the nearer of the two ends: a fast machine
    whose --epochs end inside the budget still ends its cosine (it stopped at 0.59 x the peak
    lr with the budget alone), and a slow one ends on time."""
    c = clock(budget_min=60.0)
    steps(c, 1, 100, seconds=18.0, fake=fake_time)  # 30 of the 60 minutes: the epochs ran out
    assert c.progress(1.0) == 1.0
    slow = clock(budget_min=1.0)
    steps(slow, 1, 30, seconds=2.0, fake=fake_time)  # the budget is spent after a tenth
    assert slow.progress(0.1) == pytest.approx(1.0) and slow.spent


def test_clock_without_a_budget_follows_the_steps(fake_time, restore_signals):
    c = clock()
    steps(c, 1, 3, seconds=100.0, fake=fake_time)
    assert c.progress(0.25) == 0.25 and not c.spent


def test_checkpoints_are_due_by_the_interval_and_at_a_stop(fake_time, restore_signals):
    c = clock(every_min=1.0, max_steps=100)
    due = steps(c, 1, 40, seconds=2.0, fake=fake_time)  # due once 60 s passed since the start
    assert due.index(True) == 29 and c.stop is False
    c.saved()
    assert steps(c, 41, 29, seconds=2.0, fake=fake_time) == [False] * 29
    assert steps(c, 70, 31, seconds=0.1, fake=fake_time)[-1] is True and c.stop  # step 100
    spent = clock(budget_min=0.01, every_min=1e-6)
    assert steps(spent, 1, 1, seconds=5.0, fake=fake_time) == [False]  # spent: the epoch's end
    assert spent.spent                                                # saves, not the interval


def test_a_signal_stops_the_run_at_the_next_step_and_is_remembered(fake_time, restore_signals):
    c = clock()
    assert steps(c, 1, 2, seconds=1.0, fake=fake_time) == [False, False]
    signal.raise_signal(signal.SIGUSR1)  # what SLURM sends before pre-empting a job
    assert c.signal == 0  # only a flag until the step ends
    assert steps(c, 3, 1, seconds=1.0, fake=fake_time) == [True]
    assert c.stop and c.signal == signal.SIGUSR1


def test_a_resumed_clock_starts_from_the_checkpoint_s_time(fake_time, restore_signals):
    c = clock(budget_min=1.0, ckpt={"elapsed": 60.0})
    assert c.spent and c.progress(0.0) == 1.0


def test_logbook_sums_each_epoch_and_stops_on_a_nan(tmp_path, fake_time, capsys):
    args = C.with_settings(simclr.Args(), out_dir=str(tmp_path))
    log = C.Logbook(args, "simclr", ENV, None, epochs=3)
    for batch, value in enumerate([1.0, 2.0, 3.0], start=0):
        if batch == 0:
            list(log.epoch([], 0, 0, 3))
        log.step(batch + 1, torch.tensor(value), {"a": torch.tensor(2 * value)}, lr=0.5)
    fake_time.now += 2.0
    losses = log.end_epoch(0, 3)
    assert losses == {"loss": 2.0, "a": 4.0, "images_per_s": 3 * 8 / 2.0}
    record = log.record({"epoch": 1, "step": 3, **losses, "lr": 0.5, "probe_acc": 0.25,
                         "knn_acc": 0.5, "rankme": 3.0, "train_min": 0.1})
    assert "epoch 1/3 | loss 2.0000" in capsys.readouterr().out
    assert [json.loads(line) for line in open(tmp_path / "log.jsonl")] == [record]
    size = log.size()
    log.write({"step": 20, "loss": 1.0, "lr": 0.1})  # logged after a checkpoint ...
    resumed = C.Logbook(args, "simclr", ENV, {"sums": torch.tensor([5.0]), "log_bytes": size}, 3)
    assert os.path.getsize(tmp_path / "log.jsonl") == size  # ... and forgotten on resume
    assert torch.equal(resumed.sums, torch.tensor([5.0]))
    list(resumed.epoch([], 1, 0, 3))
    assert resumed.sums is None  # a new epoch starts its sums again
    with pytest.raises(FloatingPointError, match="loss is nan at step 20; lower --base-lr"):
        resumed.step(20, torch.tensor(float("nan")), {}, lr=0.1)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_checkpoint_round_trip_and_the_settings_check(tmp_path, fake_time, restore_signals):
    """save_checkpoint writes what resume() restores (state dicts, where the run is, the RNG);
    load_checkpoint refuses other settings, naming each flag, but not other run settings."""
    args = C.with_settings(simclr.Args(), out_dir=str(tmp_path), batch_size=64)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    c, log = clock(out_dir=str(tmp_path)), C.Logbook(args, "simclr", ENV, None, 1)
    c.elapsed, log.sums = 12.5, torch.tensor([3.0])
    rng = torch.get_rng_state()
    C.save_checkpoint(args, "simclr", ENV, {"model": model, "optimizer": opt,
                                              "probe_optimizer": opt, "scaler": model},
                      (1, 2, 7), c, log)
    torch.rand(3)  # the RNG moves on
    ckpt = C.load_checkpoint(str(tmp_path / "checkpoint.pt"), args, "simclr")
    assert ckpt["args"] == C.settings(args) and ckpt["elapsed"] == 12.5
    fresh, fresh_opt = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), None
    fresh_opt = torch.optim.SGD(fresh.parameters(), 0.1, momentum=0.9)
    assert C.resume(ckpt, {"model": fresh, "optimizer": fresh_opt}) == (1, 2, 7)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert torch.equal(torch.get_rng_state(), rng)
    assert C.resume(None, {"model": fresh}) == (0, 0, 0)
    with pytest.raises(ValueError, match=r"--temperature 0.5 \(checkpoint: 0.15\), --seed 1 "
                                         r"\(checkpoint: 0\);"):
        C.load_checkpoint(str(tmp_path / "checkpoint.pt"),
                          C.with_settings(args, temperature=0.5, seed=1), "simclr")
    for run_only in ("num_workers", "max_steps", "checkpoint_every_min"):
        C.load_checkpoint(str(tmp_path / "checkpoint.pt"),
                          C.with_settings(args, **{run_only: 3}), "simclr")
    with pytest.raises(ValueError, match="is not a checkpoint of vicreg.py"):
        C.load_checkpoint(str(tmp_path / "checkpoint.pt"), args, "vicreg")


def test_settings_are_flat_as_the_flags_and_with_settings_finds_their_group():
    args = simclr.Args()
    flat = C.settings(args)
    assert list(flat)[:3] == ["train_beton", "val_beton", "num_classes"]
    assert flat["temperature"] == 0.15 and flat["out_dir"] == "runs/simclr"
    assert flat["view1"]["resolution"] == 32 and "run" not in flat and "optim" not in flat
    changed = C.with_settings(args, batch_size=64, temperature=0.3, out_dir="x",
                              view1=C.ViewConfig(resolution=16))
    assert (changed.optim.batch_size, changed.loss.temperature, changed.run.out_dir,
            changed.view1.resolution, args.optim.batch_size) == (64, 0.3, "x", 16, 256)
    with pytest.raises(TypeError, match="no setting 'batchsize'"):
        C.with_settings(args, batchsize=64)
    assert C.RUN_ONLY == {f for f in flat if f in {
        "out_dir", "resume", "checkpoint_every_min", "max_steps", "device", "num_workers",
        "os_cache", "compile", "tensorboard", "wandb"}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), (1.0, float("nan"))])
def test_check_settings_refuses_what_is_not_finite(value):
    with pytest.raises(ValueError, match=r"^--lr .*: must be > 0$"):
        C.check_settings([("--lr", value, True, "> 0")])
    C.check_settings([("--lr", 1.0, True, "> 0")])


@pytest.mark.parametrize("stem,width", [("small", 64), ("small-stride2", 32), ("imagenet", 64)])
def test_export_contract(tmp_path, stem, width):
    """backbone.pt loads strictly into torchvision's resnet18 (ScaledResNet at another width)
    with fc = Identity() and the stem backbone.json describes; make_backbone rebuilds the same
    network from backbone.json alone (what probe.py does), with the same outputs."""
    torch.manual_seed(0)
    net, features = C.make_backbone("resnet18", stem, True, width)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained": not the init
    C.export_backbone(net, str(tmp_path), "resnet18", width, 32, 0.875, "simclr", ENV)
    meta = json.load(open(tmp_path / "backbone.json"))
    assert meta == {"arch": "resnet18", "width": width, "stem": C.STEMS[stem], "resolution": 32,
                    "crop_ratio": 0.875, "method": "simclr"}
    user = torchvision.models.resnet18() if width == 64 else C.ScaledResNet("resnet18", width,
                                                                           False)
    user.fc = nn.Identity()
    conv = meta["stem"]["conv1"]
    user.conv1 = nn.Conv2d(3, width, bias=False, **conv)
    if not meta["stem"]["maxpool"]:
        user.maxpool = nn.Identity()
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    user.load_state_dict(state, strict=True)
    rebuilt, width_out = C.make_backbone(meta["arch"], meta["stem"], False, meta["width"])
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    for m in (net, user, rebuilt):
        m.eval()
    torch.testing.assert_close(user(x), net(x))
    torch.testing.assert_close(rebuilt(x), net(x))
    assert width_out == features and not [n for n in os.listdir(tmp_path) if "tmp" in n]


def test_an_operation_cannot_share_a_view_s_random_stream():
    """A new augmentation's seed_offset must be its own and below SEEDS_PER_VIEW: offset 10
    would be the next view's crop stream (the same numbers drawn twice)."""
    for offset, says in ((C.SEEDS_PER_VIEW, "must be in 1..9"), (3, "RandomGrayscale's"),
                         (0, "must be in 1..9")):
        with pytest.raises(TypeError, match=says):
            type("RandomNew", (C._BatchOp,), {"kind": 99, "seed_offset": offset})
    offsets = [op.seed_offset for op in C.ViewConfig(blur_p=1, solarize_p=1, noise_p=1,
                                                        noise_std=0.1).augmentations(0)]
    assert len(set(offsets)) == 6 and max(offsets) < C.SEEDS_PER_VIEW


def test_probe_loss_skips_unlabelled_images():
    """The online probe's loss: the labelled images' mean cross-entropy, 0 (not NaN) when the
    batch holds none, and no gradient from unlabelled images."""
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([2, -1, 0, -1, 3, 1])
    keep = y >= 0
    torch.testing.assert_close(C.probe_loss_of(logits, y), F.cross_entropy(logits[keep], y[keep]))
    C.probe_loss_of(logits, y).backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).any()
    none = C.probe_loss_of(logits, torch.full((6,), -1))
    assert none.item() == 0.0


def test_bf16_only_where_the_hardware_computes_it(monkeypatch):
    """--precision auto picks bf16 on CPUs with AVX512-BF16 or AMX and on CUDA GPUs with bf16
    units, fp32 elsewhere; probe.py uses the same rule."""
    import builtins
    import io

    import probe

    assert probe.autocast_dtype is C.autocast_dtype
    m = C
    cpu = torch.device("cpu")
    # On this machine, the same answer as torch's own CPU feature detection (cpuinfo library).
    assert m.bf16_is_fast(cpu) == (torch.cpu._is_avx512_bf16_supported()
                                   or torch.cpu._is_amx_tile_supported())
    real_open = builtins.open

    def fake_cpuinfo(flags):
        def fake_open(path, *a, **k):
            if path != "/proc/cpuinfo":
                return real_open(path, *a, **k)
            if flags is None:
                raise FileNotFoundError(path)  # not Linux
            return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", fake_open)

    for flags, expected in ((ZEN3, False), (ZEN4, True), (SPR, True), (None, False),
                            (ZEN3 + " avx512_bf16_like", False)):
        fake_cpuinfo(flags)
        assert m.bf16_is_fast(cpu) is expected, flags
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or 0)
    assert not m.bf16_is_fast(torch.device("cuda"))
    assert asked == [False]  # emulated bf16 (pre-Ampere GPUs) does not count


def test_precision_auto_picks_bf16_then_fp16_on_tensor_cores_then_fp32(monkeypatch):
    """--precision: bf16 / fp16 / fp32 as asked; auto: bf16 where it is fast, else fp16 on CUDA
    GPUs with tensor cores (compute capability 7.x: V100, T4), else fp32 (older GPUs, CPUs
    without bf16 units)."""
    m = C
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for device in (cpu, cuda):
        assert m.autocast_dtype("bf16", device) is torch.bfloat16
        assert m.autocast_dtype("fp16", device) is torch.float16
        assert m.autocast_dtype("fp32", device) is None
    for fast in (True, False):
        monkeypatch.setattr(m, "bf16_is_fast", lambda device, fast=fast: fast)
        assert m.autocast_dtype("auto", cpu) is (torch.bfloat16 if fast else None)
    for capability, expected in (((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                                 ((7, 0), torch.float16), ((6, 1), None)):
        monkeypatch.setattr(m, "bf16_is_fast", lambda device, c=capability: c >= (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert m.autocast_dtype("auto", cuda) is expected, capability


def test_lars_step_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.01
    opt = C.LARS(simclr.param_groups(model), lr, weight_decay=wd, momentum=m, eta=eta)
    grads = [(torch.randn(2, 3), torch.randn(2)) for _ in range(2)]
    w, b = w0.clone(), b0.clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for gw, gb in grads:
        model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
        opt.step()
        # by hand: weights get decay + trust ratio; the bias neither
        u = gw + wd * w
        u = u * (eta * w.norm() / u.norm())
        mu_w = m * mu_w + u
        w = w - lr * mu_w
        mu_b = m * mu_b + gb
        b = b - lr * mu_b
        torch.testing.assert_close(model.weight.detach(), w)
        torch.testing.assert_close(model.bias.detach(), b)


def test_backbones():
    net, width = C.make_backbone("resnet18", "small")
    assert width == 512 and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    net2, _ = C.make_backbone("resnet18", "small-stride2")
    assert net2.conv1.stride == (2, 2) and net2.conv1.kernel_size == (3, 3)
    assert isinstance(net2.maxpool, nn.Identity)
    net50, width50 = C.make_backbone("resnet50", "imagenet")
    assert width50 == 2048 and net50.conv1.stride == (2, 2)
    assert isinstance(net50.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="unknown architecture 'vit_b_16'"):
        C.make_backbone("vit_b_16", "small")
    assert C.resolve_stem("auto", 64) == "small" and C.resolve_stem("auto", 96) == (
        "imagenet") and C.resolve_stem("small-stride2", 224) == "small-stride2"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_scaled_resnet_is_torchvisions_with_every_width_scaled(arch):
    """ScaledResNet at width 64 has torchvision's tensors, name for name and shape for shape; at
    width 32 every channel count is halved (the RGB input and kernel sizes kept)."""
    ref = torchvision.models.get_model(arch, weights=None).state_dict()
    assert {k: v.shape for k, v in C.ScaledResNet(arch, 64, True).state_dict().items()} == {
        k: v.shape for k, v in ref.items()}
    half = {k: v.shape for k, v in C.ScaledResNet(arch, 32, True).state_dict().items()}
    for name, tensor in ref.items():
        if name.startswith("fc."):  # the classifier: 1000 classes from half the features
            expected = (1000, tensor.shape[-1] // 2)[:tensor.dim()]
        else:
            expected = tuple(d if d == 3 or i >= 2 else d // 2 for i, d in enumerate(tensor.shape))
        assert tuple(half[name]) == expected, name
    net, features = C.make_backbone(arch, "small-stride2", False, 32)
    assert features == ref["fc.weight"].shape[1] // 2
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, features)
    with pytest.raises(ValueError, match="--width 40: must be a multiple of 16"):
        simclr.validate(C.with_settings(simclr.Args(), width=40))


def test_residual_blocks_start_as_the_identity():
    """zero_init_residual, as the official SimCLR, Barlow Twins and VICReg code: each block's
    last BatchNorm scale is 0, so a block without a downsampling shortcut returns relu(x)."""
    net, _ = C.make_backbone("resnet18", "small")
    for block in (net.layer1[0], net.layer1[1], net.layer2[1], net.layer4[1]):
        assert torch.count_nonzero(block.bn2.weight) == 0
    x = torch.randn(2, 64, 8, 8).relu()
    assert torch.equal(net.layer1[0].eval()(x), x)


def test_rankme_against_its_formula():
    """RankMe (Garrido et al. 2023, eq. 1) computed naively with numpy; k equal singular values
    give k; a collapsed embedding (every row the same) gives 1."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 40, generator=gen) @ torch.randn(40, 40, generator=gen)
    s = np.linalg.svd(feats.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert C.rankme(feats) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(300, 7, generator=gen, dtype=torch.float64))
    assert C.rankme(q.float() * 3) == pytest.approx(7, rel=1e-4)
    assert C.rankme(torch.ones(50, 16) * torch.randn(1, 16, generator=gen)) == pytest.approx(
        1, rel=1e-3)


def test_knn_leave_one_out_against_a_loop():
    """Each point voted by its k nearest other points, weights exp(cos / T), in a plain loop."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (2500,), generator=gen)  # three of its 1024-row chunks
    feats = torch.randn(2500, 8, generator=gen) + 1.5 * F.one_hot(labels, 8).float()
    k, t = 5, 0.1
    unit = F.normalize(feats, dim=1)
    correct = 0
    for i in range(len(feats)):
        sims = (unit @ unit[i]).tolist()  # cosine similarity to every point
        others = sorted((j for j in range(len(feats)) if j != i), key=lambda j: -sims[j])
        votes = [0.0] * 4
        for j in others[:k]:
            votes[int(labels[j])] += math.exp(sims[j] / t)
        correct += votes.index(max(votes)) == int(labels[i])
    got = C.knn_leave_one_out(feats, labels, k=k, temperature=t)
    assert got == pytest.approx(correct / len(feats), abs=1 / len(feats))  # a tie at most
    assert 0.5 < got < 1  # separable enough to beat chance (0.25), noisy enough to err


def _clock_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fake = FakeTime()
    C.time = fake  # each process its own fake seconds: rank 1 is twice as slow
    env = C.Env(torch.device("cpu"), rank, world, 8, None, False)
    c = C.Clock(10.0, C.RunConfig(out_dir="unused"), env, None)
    seen = []
    for step in range(1, 61):
        if rank == 1 and step == 25:
            c.caught["signal"] = signal.SIGUSR1  # caught by rank 1 only
        c.start_step()
        fake.now += 1.0 * (1 + rank)
        c.end_step(step)
        seen.append((c.elapsed, c.signal, c.stop))
        if c.stop:
            break
    out[rank] = seen
    dist.destroy_process_group()


def test_ddp_processes_agree_every_20_steps_on_time_and_signals():
    """Two gloo processes, one twice as slow, rank 1 alone catching SIGUSR1 at step 25: both
    see the same training time at every step (the slower one's at each agreement, extrapolated
    in between) and both stop at step 40, the next agreement, with the same signal."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_clock_worker, args=(2, port, out), nprocs=2, join=True)
    assert out[0] == out[1] and len(out[0]) == 40
    elapsed = [e for e, _, _ in out[0]]
    assert elapsed[19] == pytest.approx(40.0) and elapsed[39] == pytest.approx(80.0)
    assert elapsed[29] == pytest.approx(60.0)  # extrapolated: 2 s per step since step 20
    assert out[0][-1][1:] == (signal.SIGUSR1, True) and not any(st for _, _, st in out[0][:-1])


def test_non_finite_weights_are_never_saved_nor_exported(tmp_path, fake_time, restore_signals):
    args = C.with_settings(simclr.Args(), out_dir=str(tmp_path))
    model = tiny_model()
    c, log = clock(out_dir=str(tmp_path)), C.Logbook(args, "simclr", ENV, None, 1)
    C.save_checkpoint(args, "simclr", ENV, {"model": model}, (0, 1, 1), c, log)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        model[1].running_var[2] = float("inf")  # a buffer counts too
    with pytest.raises(FloatingPointError, match=r"not finite at step 2 \(first: 1.running_var\)"):
        C.save_checkpoint(args, "simclr", ENV, {"model": model}, (0, 2, 2), c, log)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good  # the last good one is kept
    with pytest.raises(FloatingPointError, match="not finite"):
        C.export_backbone(model, str(tmp_path), "resnet18", 64, 32, 1.0, "simclr", ENV)
    assert not (tmp_path / "backbone.pt").exists()


RESOLVED = {"device": "cpu", "world": 2, "precision": "bf16",
            "data": [{"path": "/d/a.beton", "bytes": 10, "images": 5, "sha256": "ab"}]}


@pytest.mark.parametrize("change,says", [
    ({"world": 1}, "saved by a run of 2 process(es), this one has 1"),
    ({"precision": "fp32", "device": "cuda:0"}, "trained in bf16, this run computes in fp32 (on cuda:0): pass --precision bf16"),
    ({"data": [{**RESOLVED["data"][0], "sha256": "cd"}]}, "/d/a.beton is not the file the "
                                                           "checkpoint trained on"),
])
def test_a_resume_keeps_the_world_size_the_precision_and_the_data(change, says):
    C.check_same_run("ckpt.pt", RESOLVED, RESOLVED)
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        C.check_same_run("ckpt.pt", RESOLVED, {**RESOLVED, **change})
    assert "--no-resume" in str(err.value) and "\n" not in str(err.value)


def test_the_fingerprint_sees_a_file_rewritten_with_other_images(tmp_path):
    """Same name, same image count, same size (raw 28 px images): other pixels."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    import numpy as np

    def write(seed):
        rng = np.random.default_rng(seed)
        data = [(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), i % 3) for i in range(50)]
        DatasetWriter(str(tmp_path / "a.beton"), {"image": RGBImageField(), "label": IntField()},
                      num_workers=1).from_indexed_dataset(data)
        return C.fingerprint(str(tmp_path / "a.beton"))

    first, again, other = write(0), write(0), write(1)
    assert first == again and first["bytes"] == other["bytes"] and first["images"] == 50
    assert first["sha256"] != other["sha256"]


def test_one_run_per_out_dir(tmp_path):
    """A second process into the same --out-dir is refused, naming the one that holds it; the
    same process may start its next run there (a run of its own that is over)."""
    import subprocess
    import sys

    C.lock_out_dir(str(tmp_path))
    C.lock_out_dir(str(tmp_path))  # this process again: fine
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import ffcv_ssl_common as C\n"
              "try:\n    C.lock_out_dir(sys.argv[2])\nexcept ValueError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(C.__file__),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert f"is in use by another run (process {os.getpid()} on" in done.stdout, done.stderr
    C.release_out_dirs()
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(C.__file__),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout == ""  # free again


def test_folders_that_cannot_be_written_are_named(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert C.folder_problem(str(afile / "sub")) == f"{afile} is a file, not a folder"
    assert C.folder_problem(str(tmp_path / "new" / "deeper")) is None
    with pytest.raises(ValueError, match="^--out-dir .*afile.txt is a file, not a folder"):
        C.RunConfig(out_dir=str(afile / "sub")).validate()


def test_a_log_shorter_than_the_checkpoint_says_is_not_padded(tmp_path):
    """A resume cuts log.jsonl back to its length at the checkpoint; a log that was shortened
    or deleted meanwhile is left as it is (truncate() would append zero bytes), and curves.png
    is drawn from whatever lines parse."""
    args = C.with_settings(simclr.Args(), out_dir=str(tmp_path))
    (tmp_path / "log.jsonl").write_text('{"step": 20, "loss": 1.0, "lr": 0.1}\n{"step": 4')
    C.Logbook(args, "simclr", ENV, {"sums": None, "log_bytes": 10_000}, 1).close()
    assert b"\0" not in (tmp_path / "log.jsonl").read_bytes()
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_failed_save_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.save_atomic({"a": torch.zeros(2)}, str(path))
    good = path.read_bytes()

    def full_disk(obj, f):
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="cannot write .*checkpoint.pt .*file write failed.*the "
                                      "previous version, if any, is kept"):
        C.save_atomic({"a": torch.ones(2)}, str(path))
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]
