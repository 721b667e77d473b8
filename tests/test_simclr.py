"""simclr.py's pure functions against references written differently (the paper's per-anchor
loss, a hand-computed LARS step), the DDP loss with 2 CPU processes, and probe.py's k-NN."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import simclr
from conftest import run_ddp
from simclr import LARS, learning_rate, nt_xent_loss


def naive_nt_xent(z1, z2, tau):
    """SimCLR paper, Algorithm 1: views 2k and 2k+1 are a positive pair; l(i, j) =
    -log(exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)); loss = mean of l over all 2N anchors."""
    n = z1.shape[0]
    z = torch.stack([z1, z2], dim=1).reshape(2 * n, -1)  # interleaved: 0,1 = image 0's views
    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        sims = [torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / tau for k in range(2 * n)]
        denominator = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        total = total - torch.log(torch.exp(sims[j]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 1.0), (8, 16, 0.15), (5, 7, 0.5)])
def test_nt_xent_matches_the_paper(n, d, tau):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    torch.testing.assert_close(nt_xent_loss(z1, z2, tau), naive_nt_xent(z1, z2, tau),
                               rtol=1e-5, atol=1e-5)


def test_nt_xent_extremes():
    # Identical views, orthogonal images: the positive has similarity 1, negatives 0.
    z = torch.eye(4)
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 6 * math.exp(0)))
    torch.testing.assert_close(nt_xent_loss(z, z.clone(), tau), torch.tensor(expected))


@pytest.mark.parametrize("module,loss_of", [
    ("simclr", lambda m, z: m.nt_xent_loss(z[0], z[1], 0.15)),
    ("barlowtwins", lambda m, z: m.barlow_twins_loss(z[0], z[1], 0.0051)),
    ("vicreg", lambda m, z: m.vicreg_loss(z[0], z[1])[0]),
    # one negative patch per image: the third chunk of the projector's output, (8, K=1, d)
    ("instance_simclr", lambda m, z: m.instance_nt_xent_loss(z[0], z[1], z[2][:, None], 0.15)),
])
def test_loss_is_fp32_under_bf16_autocast(module, loss_of):
    """The backbone and projector run in bf16, the loss on their (fp32-cast) outputs in fp32:
    bf16 matmuls would round the similarities / correlation sums to 8 significant bits."""
    import importlib

    m = importlib.import_module(module)
    args = m.Args(arch="resnet18", projector_dims=(64, 32))
    torch.manual_seed(0)
    model = m.__dict__[{"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "vicreg": "VICReg",
                        "instance_simclr": "InstanceSimCLR"}[module]](args, "small")
    outputs = []
    model.projector.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    x1, x2, y = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if module == "instance_simclr":
            loss = model(x1, x2, [torch.randn(8, 3, 16, 16)], y)[0]
        else:
            loss = model(x1, x2, y)[0]
    assert outputs[0].dtype == torch.bfloat16  # the network did run under autocast
    assert loss.dtype == torch.float32
    if len(outputs) == 1:  # SimCLR and instance SimCLR: every view in one projector call
        outputs = outputs[0].chunk({"simclr": 2, "instance_simclr": 3}[module])
    expected = loss_of(m, [out.float() for out in outputs])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


# /proc/cpuinfo flags of three real CPUs: an AVX2-only EPYC (Zen 3, this project's build machine,
# where bf16 autocast ran 12x slower than fp32), a Zen 4 EPYC and a Sapphire Rapids Xeon.
ZEN3 = "fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq rdpid fsrm"
ZEN4 = ZEN3 + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512vnni"
SPR = "fpu sse2 avx2 avx512f avx512bw avx512_fp16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("module", ["simclr", "barlowtwins", "vicreg", "instance_simclr", "probe"])
def test_bf16_only_where_the_hardware_computes_it(module, monkeypatch):
    """--precision auto picks bf16 on CPUs with AVX512-BF16 or AMX and on CUDA GPUs with bf16
    units, fp32 elsewhere; the same rule in every file."""
    import builtins
    import importlib
    import io

    m = importlib.import_module(module)
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


@pytest.mark.parametrize("module", ["simclr", "barlowtwins", "vicreg", "instance_simclr", "probe"])
def test_precision_auto_picks_bf16_then_fp16_on_tensor_cores_then_fp32(module, monkeypatch):
    """--precision: bf16 / fp16 / fp32 as asked; auto: bf16 where it is fast, else fp16 on CUDA
    GPUs with tensor cores (compute capability 7.x: V100, T4), else fp32 (older GPUs, CPUs
    without bf16 units)."""
    import importlib

    m = importlib.import_module(module)
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


def test_nt_xent_gradient():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3), (z1, z2))


def test_nt_xent_under_ddp_equals_single_process():
    """2 gloo processes, each with half the batch: the mean of their losses is the single-process
    loss on the whole batch, and the gradients (summed over ranks by all_gather's backward, then
    averaged by DDP) are the single-process gradients."""
    g = torch.Generator().manual_seed(1)
    z1, z2, world = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), 2
    ranks, (full, grad1_full, grad2_full) = run_ddp("nt_xent", z1, z2, world)
    losses = torch.stack([r[0] for r in ranks])
    torch.testing.assert_close(losses.mean(), full)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / world, grad1_full)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / world, grad2_full)


def test_lars_step_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.01
    opt = LARS(simclr.param_groups(model), lr, weight_decay=wd, momentum=m, eta=eta)
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


def test_param_groups_exclude_biases_and_batchnorm():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    weights, others = simclr.param_groups(model)
    assert [p.shape for p in weights["params"]] == [torch.Size([4, 4])]
    assert len(others["params"]) == 3 and others["lars_exclude"] and others["weight_decay"] == 0


def test_schedule_values():
    peak, warm = 2.0, 0.1
    assert learning_rate(0.0, warm, peak) == 0.0
    assert learning_rate(0.05, warm, peak) == pytest.approx(peak / 2)
    assert learning_rate(0.1, warm, peak) == pytest.approx(peak)
    assert learning_rate(0.55, warm, peak) == pytest.approx(peak / 2)
    assert learning_rate(1.0, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(1.5, warm, peak) == pytest.approx(0.0, abs=1e-12)  # past the budget
    cosine = peak * 0.5 * (1 + math.cos(0.3 * math.pi))
    assert learning_rate(0.3, 0.0, peak) == pytest.approx(cosine)
    values = [learning_rate(s / 1000, warm, peak) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine decays monotonically


def test_backbones():
    net, width = simclr.make_backbone("resnet18", "small")
    assert width == 512 and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    net2, _ = simclr.make_backbone("resnet18", "small-stride2")
    assert net2.conv1.stride == (2, 2) and net2.conv1.kernel_size == (3, 3)
    assert isinstance(net2.maxpool, nn.Identity)
    net50, width50 = simclr.make_backbone("resnet50", "imagenet")
    assert width50 == 2048 and net50.conv1.stride == (2, 2)
    assert isinstance(net50.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="unknown architecture 'vit_b_16'"):
        simclr.make_backbone("vit_b_16", "small")
    assert simclr.resolve_stem("auto", 64) == "small" and simclr.resolve_stem("auto", 96) == (
        "imagenet") and simclr.resolve_stem("small-stride2", 224) == "small-stride2"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_scaled_resnet_is_torchvisions_with_every_width_scaled(arch):
    """ScaledResNet at width 64 has torchvision's tensors, name for name and shape for shape; at
    width 32 every channel count is halved (the RGB input and kernel sizes kept)."""
    ref = torchvision.models.get_model(arch, weights=None).state_dict()
    assert {k: v.shape for k, v in simclr.ScaledResNet(arch, 64, True).state_dict().items()} == {
        k: v.shape for k, v in ref.items()}
    half = {k: v.shape for k, v in simclr.ScaledResNet(arch, 32, True).state_dict().items()}
    for name, tensor in ref.items():
        if name.startswith("fc."):  # the classifier: 1000 classes from half the features
            expected = (1000, tensor.shape[-1] // 2)[:tensor.dim()]
        else:
            expected = tuple(d if d == 3 or i >= 2 else d // 2 for i, d in enumerate(tensor.shape))
        assert tuple(half[name]) == expected, name
    net, features = simclr.make_backbone(arch, "small-stride2", False, 32)
    assert features == ref["fc.weight"].shape[1] // 2
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, features)
    with pytest.raises(ValueError, match="--width 40: must be a multiple of 16"):
        simclr.validate(simclr.Args(width=40))


def test_residual_blocks_start_as_the_identity():
    """zero_init_residual, as the official SimCLR, Barlow Twins and VICReg code: each block's
    last BatchNorm scale is 0, so a block without a downsampling shortcut returns relu(x)."""
    net, _ = simclr.make_backbone("resnet18", "small")
    for block in (net.layer1[0], net.layer1[1], net.layer2[1], net.layer4[1]):
        assert torch.count_nonzero(block.bn2.weight) == 0
    x = torch.randn(2, 64, 8, 8).relu()
    assert torch.equal(net.layer1[0].eval()(x), x)


def test_projector_last_bias():
    assert simclr.mlp((8, 16, 4))[-1].bias is not None
    assert simclr.mlp((8, 16, 4), last_bias=False)[-1].bias is None


def test_projector_depth_and_widths():
    proj = simclr.mlp((512, 64, 64, 16))
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 64), (64, 16)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in proj) == 2  # hidden layers only


def test_knn_against_a_loop():
    """Seven classes: top-5 means something (probe.py reports it only above 5 classes)."""
    import probe

    g = torch.Generator().manual_seed(0)
    c = 7
    train_x, val_x = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    train_y, val_y = torch.randint(0, c, (60,), generator=g), torch.randint(0, c, (30,), generator=g)
    got = probe.knn(train_x, train_y, val_x, val_y, k=60, temperature=0.1, num_classes=c)
    correct1 = correct5 = 0
    for x, y in zip(val_x, val_y):
        sims = [(torch.cosine_similarity(x, t, dim=0).item(), int(k)) for t, k in zip(train_x, train_y)]
        sims.sort(reverse=True)
        votes = [0.0] * c
        for s, k in sims[:60]:  # every neighbour votes: every class gets votes
            votes[k] += math.exp(s / 0.1)
        assert min(votes) > 0  # every class voted: no ties in the ranking
        order = sorted(range(c), key=lambda k: -votes[k])
        correct1 += order[0] == y
        correct5 += y in order[:5]
    assert 0 < correct1 < correct5 < 30  # a test that can tell top-1 from top-5
    assert got["top1"] == pytest.approx(correct1 / 30)
    assert got["top5"] == pytest.approx(correct5 / 30)


def test_rankme_against_its_formula():
    """RankMe (Garrido et al. 2023, eq. 1) computed naively with numpy; k equal singular values
    give k; a collapsed embedding (every row the same) gives 1."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 40, generator=gen) @ torch.randn(40, 40, generator=gen)
    s = np.linalg.svd(feats.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert simclr.rankme(feats) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(300, 7, generator=gen, dtype=torch.float64))
    assert simclr.rankme(q.float() * 3) == pytest.approx(7, rel=1e-4)
    assert simclr.rankme(torch.ones(50, 16) * torch.randn(1, 16, generator=gen)) == pytest.approx(
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
    got = simclr.knn_leave_one_out(feats, labels, k=k, temperature=t)
    assert got == pytest.approx(correct / len(feats), abs=1 / len(feats))  # a tie at most
    assert 0.5 < got < 1  # separable enough to beat chance (0.25), noisy enough to err
