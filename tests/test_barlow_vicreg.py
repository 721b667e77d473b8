"""barlowtwins.py and vicreg.py: each loss against a naive reference written from the paper, a
gradient check, collapsed inputs, the DDP path with 2 CPU processes, and each script end to end
(train, resume, export, probe, torchrun) on the tiny .beton the tests write."""


import pytest
import torch

from barlowtwins import barlow_twins_loss
from conftest import run_ddp
from vicreg import vicreg_loss


def naive_barlow(z1, z2, lambd):
    """Loops: standardise each dimension over the batch (biased variance, eps 1e-5 as BatchNorm),
    C_ij = sum_b z1_bi z2_bj / N, then the two sums of the paper's eq. 1."""
    n, d = z1.shape

    def standardise(z):
        out = torch.empty_like(z)
        for j in range(d):
            col = z[:, j]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            out[:, j] = (col - mean) / torch.sqrt(var + 1e-5)
        return out

    a, b = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def naive_vicreg(z1, z2, sim, std, cov):
    n, d = z1.shape
    inv = sum(((z1[k, j] - z2[k, j]) ** 2 for k in range(n) for j in range(d))) / (n * d)
    var_term, cov_term = 0.0, 0.0
    for z in (z1, z2):
        means = [sum(z[:, j]) / n for j in range(d)]
        for j in range(d):
            variance = sum((z[k, j] - means[j]) ** 2 for k in range(n)) / (n - 1)
            var_term = var_term + max(0.0, 1 - torch.sqrt(variance + 1e-4)) / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = sum((z[k, i] - means[i]) * (z[k, j] - means[j]) for k in range(n)) / (n - 1)
                    cov_term = cov_term + c ** 2 / d
    return sim * inv + std * var_term + cov * cov_term, (inv, var_term, cov_term)


def pair(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("n,d,lambd", [(6, 4, 0.0051), (10, 5, 0.5)])
def test_barlow_twins_matches_the_paper(n, d, lambd):
    z1, z2 = pair(n, d, n)
    z2 = z2 + 0.8 * z1  # correlated, as two views are
    torch.testing.assert_close(barlow_twins_loss(z1, z2, lambd), naive_barlow(z1, z2, lambd),
                               rtol=1e-4, atol=1e-4)


def test_barlow_twins_collapse_and_gradient():
    z = torch.ones(8, 6)  # every embedding equal: standardised to 0, C = 0, loss = D
    torch.testing.assert_close(barlow_twins_loss(z, z.clone(), 0.0051), torch.tensor(6.0))
    z1, z2 = pair(6, 3, 0, torch.float64)
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.1), (z1, z2))


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)])
def test_vicreg_matches_the_paper(coeffs):
    z1, z2 = pair(7, 4, 1)
    z1 = z1 * 0.5  # some dimensions below unit std so the hinge is active
    total, terms = vicreg_loss(z1, z2, *coeffs)
    ref_total, (inv, var, cov) = naive_vicreg(z1, z2, *coeffs)
    torch.testing.assert_close(total, torch.as_tensor(ref_total), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["repr"], torch.as_tensor(inv), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["std"], torch.as_tensor(var), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["cov"], torch.as_tensor(cov), rtol=1e-4, atol=1e-5)


def test_vicreg_collapse_and_gradient():
    z = torch.ones(8, 5)  # collapse: no invariance or covariance cost, std = sqrt(1e-4) = 0.01
    total, terms = vicreg_loss(z, z.clone())
    assert terms["repr"] == 0 and terms["cov"] == 0
    torch.testing.assert_close(terms["std"], torch.tensor(0.99))
    torch.testing.assert_close(total, torch.tensor(25 * 0.99))
    z1, z2 = pair(6, 3, 2, torch.float64)
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b)[0], (z1, z2))


@pytest.mark.parametrize("name", ["barlow", "vicreg"])
def test_ddp_equals_single_process(name):
    """Each of 2 gloo processes holds half the batch and computes the global-batch loss; the
    gradient reaching its half (all_gather's backward sums it over the 2 processes), halved by
    DDP's averaging, is the single-process gradient."""
    z1, z2 = pair(8, 5, 3)
    ranks, (full, grad1_full, grad2_full) = run_ddp(name, z1, z2)
    for r in ranks:
        torch.testing.assert_close(r[0], full)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / 2, grad1_full)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, grad2_full)
