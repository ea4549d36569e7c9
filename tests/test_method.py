"""The two pure functions of the method, checked against closed-form answers."""
import math

import pytest
import torch

from common import NCSNError
from noise import consistent_levels, get_sigmas
from runner import anneal_langevin_dynamics, consistent_annealed_sampling, dsm_loss, score_between_levels


def test_sigmas_are_geometric_from_begin_to_end():
    s = get_sigmas(1.0, 0.01, 10)
    assert s.shape == (10,)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full((9,), 0.01 ** (1 / 9)))


def gaussian_score(mu, s0, sigmas):
    """The exact score of N(mu, s0^2 I) convolved with N(0, sigma_i^2 I)."""
    def score(x, labels):
        var = s0 ** 2 + sigmas[labels].view(-1, *([1] * (x.dim() - 1))) ** 2
        return -(x - mu) / var
    return score


def test_dsm_loss_of_the_true_score_has_its_closed_form():
    # data x ~ N(0, s0^2 I) in D dimensions; with the true score of the noised data the DSM loss
    # 1/2 E||s(x~) + z/sigma||^2 sigma^2 equals D s0^2 / (2 (s0^2 + sigma^2)) (its minimum).
    torch.manual_seed(123)  # not a seed of the noise generators below: x and z must be independent
    s0, D, B = 0.5, 64, 20000
    sigmas = torch.tensor([1.0, 0.3, 0.05])
    x = s0 * torch.randn(B, 1, 8, 8)
    score = gaussian_score(0.0, s0, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        labels = torch.full((B,), i)
        loss, _ = dsm_loss(score, x, sigmas, torch.Generator().manual_seed(100 + i), labels=labels)
        expected = D * s0 ** 2 / (2 * (s0 ** 2 + sigma ** 2))
        assert loss.mean().item() == pytest.approx(expected, rel=0.02)
        # on the same noise, a scaled score does worse: the minimiser of DSM is the true score
        for factor in (0.8, 1.2):
            worse, _ = dsm_loss(lambda xt, y: factor * score(xt, y), x, sigmas, torch.Generator().manual_seed(100 + i),
                                labels=labels)
            assert worse.mean().item() > loss.mean().item()


def test_dsm_loss_is_exact_for_a_fixed_draw():
    # with s = 0 the loss is 1/2 ||z/sigma||^2 sigma^anneal_power: recompute it from the same generator
    sigmas = torch.tensor([2.0, 0.5])
    x = torch.rand(4, 1, 3, 3)
    loss, labels = dsm_loss(lambda xt, y: torch.zeros_like(xt), x, sigmas, torch.Generator().manual_seed(7),
                            anneal_power=2.0)
    g = torch.Generator().manual_seed(7)
    labels2 = torch.randint(2, (4,), generator=g)
    z = torch.randn(x.shape, generator=g)
    assert torch.equal(labels, labels2)
    torch.testing.assert_close(loss, 0.5 * (z ** 2).flatten(1).sum(1))
    loss0, _ = dsm_loss(lambda xt, y: torch.zeros_like(xt), x, sigmas, torch.Generator().manual_seed(7),
                        anneal_power=0.0)
    torch.testing.assert_close(loss0, 0.5 * ((z / sigmas[labels].view(-1, 1, 1, 1)) ** 2).flatten(1).sum(1))


def test_annealed_langevin_reaches_the_gaussian_target():
    # target N(mu, s0^2): at the last level the chain samples N(mu, s0^2 + sigma_L^2); the unadjusted
    # Langevin chain with step a has the stationary variance v / (1 - a / (2 v)) for a Gaussian of variance v.
    mu, s0 = 0.3, 0.3
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.1])
    step_lr, n_steps = 0.005, 200
    x0 = torch.rand(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))  # the same start in any test order
    g = torch.Generator().manual_seed(0)
    x = anneal_langevin_dynamics(gaussian_score(mu, s0, sigmas), x0, sigmas, n_steps, step_lr, generator=g)
    v = s0 ** 2 + 0.1 ** 2
    v_chain = v / (1 - step_lr / (2 * v))
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.var().item() == pytest.approx(v_chain, rel=0.03)


def test_langevin_step_sizes_callback_and_generator():
    sigmas = torch.tensor([1.0, 0.1])
    seen = []
    x0 = torch.zeros(2, 1, 2, 2)
    zero_score = lambda x, y: torch.zeros_like(x)  # noqa: E731  pure diffusion: x_T - x_0 = sum sqrt(2 a_i) z
    out = anneal_langevin_dynamics(zero_score, x0, sigmas, 3, 1e-3, torch.Generator().manual_seed(5),
                                   callback=lambda i, t, x: seen.append((i, t)))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    g = torch.Generator().manual_seed(5)
    z = torch.stack([torch.randn(x0.shape, generator=g) for _ in range(6)])
    a = [1e-3 * (1.0 / 0.1) ** 2] * 3 + [1e-3] * 3
    expected = sum(math.sqrt(2 * ai) * zi for ai, zi in zip(a, z))
    torch.testing.assert_close(out, expected)
    # the same generator seed gives the same samples; the labels passed are the level indices
    labels_seen = set()
    anneal_langevin_dynamics(lambda x, y: labels_seen.update(y.tolist()) or torch.zeros_like(x), x0, sigmas, 1,
                             1e-3, torch.Generator().manual_seed(5))
    assert labels_seen == {0, 1}


def test_levels_between_the_trained_ones_contain_them_and_are_geometric():
    sigmas = get_sigmas(1.0, 0.01, 4)
    levels = consistent_levels(sigmas, 3)
    assert levels.shape == (10,)
    torch.testing.assert_close(levels[::3], sigmas)
    torch.testing.assert_close(levels[1:] / levels[:-1], torch.full((9,), 0.01 ** (1 / 9)))


def test_score_between_levels_holds_the_denoised_estimate_of_the_nearest_level():
    # for a point mass at mu the denoised estimate is mu at every level, so the score it gives is exact everywhere;
    # for N(mu, s0^2) it is exact at the trained levels and, between them, the nearest level's D(x) = x + sigma_i^2 s
    mu, sigmas = 0.4, get_sigmas(1.0, 0.01, 4)
    levels = consistent_levels(sigmas, 3)
    x = torch.rand(len(levels), 1, 3, 3)
    j = torch.arange(len(levels))
    point = score_between_levels(gaussian_score(mu, 0.0, sigmas), sigmas, levels)
    torch.testing.assert_close(point(x, j), gaussian_score(mu, 0.0, levels)(x, j))
    spread = score_between_levels(gaussian_score(mu, 0.3, sigmas), sigmas, levels)
    torch.testing.assert_close(spread(x, j)[::3], gaussian_score(mu, 0.3, sigmas)(x[::3], j[::3] // 3))
    nearest = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3, 3])  # by log sigma: a third of the way rounds down
    expected = gaussian_score(mu, 0.3, sigmas)(x, nearest) * (sigmas[nearest] / levels).view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(spread(x, j), expected)


@pytest.mark.parametrize("step_lr", [2e-5, 1e-4])  # eta = step_lr / sigma_L^2 = 0.2 and 1 (the whole noise renewed)
def test_consistent_sampling_carries_exactly_the_next_levels_noise(step_lr):
    # Gaussian noise around a point mass, with the exact score: after the step into level i the noise has std
    # levels[i] (Algorithm 2's consistency), whatever eta is; the chain ends at sigma_L, then Tweedie's step gives mu
    mu, sigmas = 0.3, get_sigmas(1.0, 0.01, 4)
    levels = consistent_levels(sigmas, 10)  # ratio 1.166 a level: eta >= 0.142
    g = torch.Generator().manual_seed(0)
    x0 = mu + levels[0] * torch.randn(1000, 1, 6, 6, generator=g)
    seen = {}
    score = score_between_levels(gaussian_score(mu, 0.0, sigmas), sigmas, levels)
    x = consistent_annealed_sampling(score, x0, levels, step_lr, g, callback=lambda i, t, x: seen.update({i: x.std()}))
    assert sorted(seen) == list(range(1, len(levels)))
    for i, std in seen.items():
        assert std.item() == pytest.approx(levels[i].item(), rel=0.02), i
    assert (x - mu).std().item() == pytest.approx(0.01, rel=0.02)
    assert (x - mu).mean().abs().item() < 0.001
    denoised = consistent_annealed_sampling(score, x0, levels, step_lr, torch.Generator().manual_seed(0), denoise=True)
    torch.testing.assert_close(denoised, torch.full_like(x0, mu))


def test_consistent_sampling_names_a_step_it_cannot_take():
    sigmas = get_sigmas(1.0, 0.01, 4)  # ratio 4.64 a level: eta must be >= 1 - 1 / 4.64 = 0.78
    for step_lr in (5e-5, 1.5e-4):
        with pytest.raises(NCSNError, match="sampling.step_lr") as e:
            consistent_annealed_sampling(gaussian_score(0.0, 0.0, sigmas), torch.zeros(2, 1, 2, 2), sigmas, step_lr)
        assert "\n" not in str(e.value)
