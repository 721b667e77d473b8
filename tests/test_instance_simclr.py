"""instance_simclr.py: the loss against a per-image loop, the independence of images (and its
opposite with in-batch negatives, which must equal simclr.py's NT-Xent when there are no patch
negatives), the DDP path, the patch recipes, and the script end to end."""

import math

import pytest
import torch

import ffcv_ssl_common as C
from conftest import run_ddp
from instance_simclr import Patches, instance_nt_xent_loss, patch_view
from simclr import nt_xent_loss


def cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def naive_instance_loss(z1, z2, z_neg, tau, in_batch=False):
    """Per image, per anchor: -log(exp(s+/tau) / (exp(s+/tau) + sum over its negatives)); the
    negatives are the image's own patches, plus, in_batch, both views of every other image."""
    n, k = z_neg.shape[:2]
    total = 0.0
    for i in range(n):
        for anchor, positive in ((z1[i], z2[i]), (z2[i], z1[i])):
            pos = torch.exp(cos(anchor, positive) / tau)
            negatives = [z_neg[i, j] for j in range(k)]
            if in_batch:
                negatives += [z[m] for m in range(n) if m != i for z in (z1, z2)]
            denominator = pos + sum(torch.exp(cos(anchor, neg) / tau) for neg in negatives)
            total = total - torch.log(pos / denominator)
    return total / (2 * n)


def embeddings(n, k, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(n, k, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("n,k,d,tau,in_batch", [(1, 1, 3, 1.0, False), (6, 1, 8, 0.15, False),
                                                (5, 3, 7, 0.5, False), (6, 2, 8, 0.15, True)])
def test_loss_matches_a_per_image_loop(n, k, d, tau, in_batch):
    z1, z2, z_neg = embeddings(n, k, d, seed=n + k)
    torch.testing.assert_close(instance_nt_xent_loss(z1, z2, z_neg, tau, in_batch),
                               naive_instance_loss(z1, z2, z_neg, tau, in_batch),
                               rtol=1e-5, atol=1e-5)


def test_other_images_do_not_change_an_images_term():
    """Without in-batch negatives the batch loss is the mean of one-image losses, and moving
    another image's embeddings changes nothing for image 0; with them, it does."""
    z1, z2, z_neg = embeddings(6, 2, 8, seed=0)
    alone = [instance_nt_xent_loss(z1[i:i + 1], z2[i:i + 1], z_neg[i:i + 1], 0.2)
             for i in range(6)]
    torch.testing.assert_close(instance_nt_xent_loss(z1, z2, z_neg, 0.2), torch.stack(alone).mean())

    def grad_of_image_0(in_batch, shift):
        a = z1.clone()
        a[3:] += shift  # move images 3-5 only
        a.requires_grad_()
        instance_nt_xent_loss(a, z2, z_neg, 0.2, in_batch).backward()
        return a.grad[0]

    torch.testing.assert_close(grad_of_image_0(False, 0.0), grad_of_image_0(False, 5.0))
    assert not torch.allclose(grad_of_image_0(True, 0.0), grad_of_image_0(True, 5.0))


def test_in_batch_without_patch_negatives_is_simclr():
    z1, z2, _ = embeddings(7, 1, 9, seed=3)
    no_patches = torch.empty(7, 0, 9)
    torch.testing.assert_close(instance_nt_xent_loss(z1, z2, no_patches, 0.15, in_batch=True),
                               nt_xent_loss(z1, z2, 0.15))


def test_extremes_and_gradient():
    # Positive identical to the anchor, negative orthogonal: -log(e^(1/tau) / (e^(1/tau) + 1)).
    z = torch.eye(4)
    z_neg = torch.roll(torch.eye(4), 1, dims=1).unsqueeze(1)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    torch.testing.assert_close(instance_nt_xent_loss(z, z.clone(), z_neg, 0.5),
                               torch.tensor(expected))
    z1, z2, z_neg = (t.requires_grad_() for t in embeddings(4, 2, 5, seed=1, dtype=torch.float64))
    for in_batch in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c: instance_nt_xent_loss(a, b, c, 0.3, in_batch), (z1, z2, z_neg))


def test_in_batch_ddp_equals_single_process():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    ranks, (full, grad1_full, grad2_full) = run_ddp("instance", z1, z2)
    torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(), full)
    # all_gather's backward sums each share's gradient over the 2 ranks; DDP then averages.
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / 2, grad1_full)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / 2, grad2_full)


def test_recipes():
    """noise: no augmentation in the loader (the noise is added on the device, below); simclr:
    SimCLR's flip, jitter, grayscale. Both crop with the patch settings."""
    noise = patch_view(Patches(noise_std=0.2, patch_scale=(0.1, 0.3), resolution=28))
    assert noise.augmentations() == [] and noise.noise_p == 0
    assert (noise.crop_scale, noise.resolution) == ((0.1, 0.3), 28)
    full = patch_view(Patches(recipe="simclr", patch_scale=(0.1, 0.3)))
    assert [type(op) for op in full.augmentations()] == [
        C.RandomHorizontalFlip, C.RandomColorJitter, C.RandomGrayscale]
    assert full.crop_scale == (0.1, 0.3) and full.saturation == C.simclr_views()[0].saturation


def test_noise_is_zero_mean_unclipped_and_reproducible():
    """The paper's additive noise: N(0, std^2) in [0, 1] image units on the normalised patch, so
    on a black background (normalised: -mean/std) it goes below black as often as above (the
    loader's uint8 noise, clipped at 0, brightened black by ~10 grey levels on average)."""
    import instance_simclr as m

    model = m.InstanceSimCLR(C.with_settings(m.Args(), noise_std=0.1, projector_dims=(16, 8)),
                             "small")
    black = ((0 - torch.tensor(C.IMAGENET_MEAN)) / torch.tensor(C.IMAGENET_STD)).float()
    x = black.view(1, 3, 1, 1).expand(64, 3, 32, 32).contiguous()
    noisy = model.add_noise(x, 1)
    grey_levels = (noisy - x) * torch.tensor(C.IMAGENET_STD).float().view(1, 3, 1, 1)
    assert abs(grey_levels.mean().item()) < 0.1  # 196,608 draws: standard error ~0.06
    assert grey_levels.std().item() == pytest.approx(0.1 * 255, rel=0.01)
    assert (grey_levels < 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.add_noise(x, 1), noisy)  # the same step: the same noise (resume)
    assert not torch.equal(model.add_noise(x, 2), noisy)  # the next step: new noise