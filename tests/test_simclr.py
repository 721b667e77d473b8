"""simclr.py's pure functions against references written differently (the paper's per-anchor
loss, the schedule's values), the DDP loss with 2 CPU processes, and probe.py's k-NN."""

import math

import pytest
import torch
import torch.nn as nn

import simclr
from conftest import run_ddp
from ffcv_ssl_common import with_settings
from simclr import learning_rate, nt_xent_loss


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
    args = with_settings(m.Args(), arch="resnet18", projector_dims=(64, 32))
    torch.manual_seed(0)
    model = m.__dict__[{"simclr": "SimCLR", "barlowtwins": "BarlowTwins", "vicreg": "VICReg",
                        "instance_simclr": "InstanceSimCLR"}[module]](args, "small")
    outputs = []
    model.projector.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    x1, x2, y = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if module == "instance_simclr":
            loss = model(x1, x2, [torch.randn(8, 3, 16, 16)], y, 0)[0]
        else:
            loss = model(x1, x2, y)[0]
    assert outputs[0].dtype == torch.bfloat16  # the network did run under autocast
    assert loss.dtype == torch.float32
    if len(outputs) == 1:  # SimCLR and instance SimCLR: every view in one projector call
        outputs = outputs[0].chunk({"simclr": 2, "instance_simclr": 3}[module])
    expected = loss_of(m, [out.float() for out in outputs])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


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
    # Barlow Twins' and VICReg's official schedule: lr = peak (q + 0.001 (1 - q)), q the cosine
    q = 0.5 * (1 + math.cos(math.pi * (0.55 - warm) / (1 - warm)))
    assert learning_rate(0.55, warm, peak, 0.001) == pytest.approx(peak * (q + 0.001 * (1 - q)))
    assert learning_rate(1.0, warm, peak, 0.001) == pytest.approx(0.001 * peak)
    assert learning_rate(0.1, warm, peak, 0.001) == pytest.approx(peak)


def test_no_widths_no_projector():
    """--projector-dims with no widths: the loss on the backbone's features (depth 0)."""
    head = simclr.mlp((512,))
    x = torch.randn(4, 512)
    assert len(head) == 0 and torch.equal(head(x), x)
    model = simclr.SimCLR(with_settings(simclr.Args(), projector_dims=()), "small")
    loss = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.arange(4))[0]
    assert torch.isfinite(loss)


def test_projector_last_bias():
    assert simclr.mlp((8, 16, 4))[-1].bias is not None
    assert simclr.mlp((8, 16, 4), last_bias=False)[-1].bias is None


def test_simclr_projector_is_the_official_head():
    """SimCLR's ProjectionHead (tf2/model.py): the last layer has no bias and a BatchNorm with
    center=False: it scales each dimension and never shifts it."""
    model = simclr.SimCLR(with_settings(simclr.Args(), projector_dims=(16, 4)), "small")
    linear, bn = model.projector[-2], model.projector[-1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.bias is None and bn.weight is not None
    assert isinstance(linear, nn.Linear) and linear.bias is None
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 0.5]))
    z = model.projector(torch.randn(256, 512))
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), bn.weight.detach(), atol=1e-3, rtol=0)


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

