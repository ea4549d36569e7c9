"""The noise levels and the step sizes that walk them.

The paper's geometric levels sigma_1 > ... > sigma_L (`get_sigmas`, `config_sigmas`); the levels and the step
of consistent annealed sampling with the check that a sampler setting can run (`consistent_levels`,
`consistent_eta`, `check_sampler`), and the sampler settings of training's snapshot grid; NCSNv2's noise design
(Song & Ermon, 2020, "Improved Techniques for Training Score-Based Generative Models"): the largest level, the
ratio of consecutive levels, their number and the Langevin step size, with the `--noise_design` command that
prints them for the training data. The samplers that walk the levels are runner.py's."""
import dataclasses
import math
import time

import numpy as np
import torch

from common import NCSNError
from data import load_mnist
from schema import ConfigError

CAS_TOLERANCE = 1e-6  # relative slack of consistent sampling's step_lr bounds, for sigmas stored in float32
SIGMA_1_CHUNK = 4096  # rows per block of the pairwise-distance search
COVERAGE_STDS = 3  # technique 2 compares the level-to-level overlap within 3 standard deviations
OVERLAP = 0.5  # ... and asks for this much of it


def get_sigmas(sigma_begin, sigma_end, num_classes):
    """The noise levels {sigma_i}: a geometric sequence from sigma_1 = sigma_begin to sigma_L = sigma_end."""
    return torch.tensor(np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_classes)),
                        dtype=torch.float32)  # (L,)


def config_sigmas(config):
    """The noise levels of a config's model section (L,), on the CPU."""
    return get_sigmas(config.model.sigma_begin, config.model.sigma_end, config.model.num_classes)


def consistent_eta(sigmas, step_lr):
    """CAS's eta = step_lr / sigma_L^2 for the levels `sigmas`, or a one-line error naming step_lr when a step
    cannot keep the noise consistent: it needs 1 - sigma_{i+1} / sigma_i <= eta <= 1 at every level."""
    sigmas = [float(s) for s in sigmas]
    eta = step_lr / sigmas[-1] ** 2
    lowest = max([1 - b / a for a, b in zip(sigmas, sigmas[1:])], default=0.0)
    if not lowest * (1 - CAS_TOLERANCE) <= eta <= 1 + CAS_TOLERANCE:  # float32 sigmas: allow rounding
        raise NCSNError(f"sampling.step_lr {step_lr:g} is outside what consistent sampling over these levels allows: "
                        f"step_lr / sigma_L^2 must lie in [{lowest:.4g}, 1], i.e. step_lr in "
                        f"[{lowest * sigmas[-1] ** 2:.3g}, {sigmas[-1] ** 2:.3g}]")
    return eta


def check_sampler(scfg, sigmas, error, context=""):
    """Raise `error` (one line, the message of consistent_eta and then `context`) when sampling.sampler cannot run
    with the settings `scfg` over the trained levels `sigmas`: consistent sampling needs a step_lr that its levels
    allow. Called before a command builds or writes anything."""
    if scfg.sampler == "consistent":
        try:
            consistent_eta(consistent_levels(sigmas, scfg.n_steps_each), scfg.step_lr)
        except NCSNError as e:
            raise error(f"{e}{context}") from e


def consistent_levels(sigmas, n_steps_each):
    """The levels CAS walks for a network trained at `sigmas` (L,): the geometric sequence from sigma_1 to
    sigma_L with n_steps_each steps between neighbouring sigma_i, (L - 1) n_steps_each + 1 levels that contain
    every sigma_i. So CAS takes (L - 1) n_steps_each steps, about the L n_steps_each of Algorithm 1."""
    n = (len(sigmas) - 1) * n_steps_each + 1
    return get_sigmas(float(sigmas[0]), float(sigmas[-1]), n).to(sigmas.device)  # (n,)


def snapshot_grid_sampling(config, sigmas):
    """The sampling settings of the snapshot grid: the configured sampler with training.snapshot_steps_each steps
    a level, the batch training.snapshot_grid, and for Langevin dynamics NCSNv2's step_lr for that T
    (langevin_step_lr)."""
    tcfg, sigmas = config.training, sigmas.cpu()
    gamma = float(sigmas[0] / sigmas[1]) if len(sigmas) > 1 else 1.0
    return dataclasses.replace(config.sampling, n_steps_each=tcfg.snapshot_steps_each,
                               batch_size=max(1, tcfg.snapshot_grid),
                               step_lr=langevin_step_lr(float(sigmas[-1]), gamma, tcfg.snapshot_steps_each)
                               if config.sampling.sampler == "langevin" else config.sampling.step_lr)


def check_training_samplers(config):
    """Every sampler setting a training run will use, checked before it starts (a ConfigError, exit 2): the
    sampling config (the metrics hook and --sample after it) and the snapshot grid's."""
    sigmas = config_sigmas(config)
    check_sampler(config.sampling, sigmas, ConfigError, f" (sampling.n_steps_each = {config.sampling.n_steps_each})")
    if config.training.snapshot_grid:
        check_sampler(snapshot_grid_sampling(config, sigmas), sigmas, ConfigError,
                      f" for the snapshot grid's training.snapshot_steps_each = {config.training.snapshot_steps_each}"
                      f" steps a level (or turn the grid off: training.snapshot_grid: 0)")


# ----------------------------------------------------------------------------------------------------------
# NCSNv2's noise design

def max_pairwise_distance(x, chunk=SIGMA_1_CHUNK):
    """The largest Euclidean distance between two rows of x (N, D): sigma_1 of technique 1; and the pair."""
    x = x.flatten(1).double()  # (N, D)
    sq = (x * x).sum(1)  # (N,)
    best, pair = -1.0, (0, 0)
    for i in range(0, len(x), chunk):
        d2 = sq[i:i + chunk, None] + sq[None, :] - 2 * x[i:i + chunk] @ x.T  # (chunk, N)
        v, j = d2.flatten().max(0)
        if v.item() > best:
            best, pair = v.item(), (i + int(j) // len(x), int(j) % len(x))
    return float((x[pair[0]] - x[pair[1]]).norm()), pair


def noise_ratio_gamma(dim):
    """gamma = sigma_{i-1} / sigma_i from technique 2, for data of `dim` dimensions:
    Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    c = math.sqrt(2 * dim)
    k = COVERAGE_STDS
    return brentq(lambda g: norm.cdf(c * (g - 1) + k * g) - norm.cdf(c * (g - 1) - k * g) - OVERLAP,
                  1.0 + 1e-9, 10.0)


def num_noise_levels(sigma_begin, sigma_end, gamma):
    """Levels of a geometric sequence from sigma_begin down to sigma_end with ratio about gamma."""
    return 1 + math.ceil(math.log(sigma_begin / sigma_end) / math.log(gamma))


def langevin_step_lr(sigma_end, gamma, n_steps_each):
    """step_lr (the sampler's, see runner.anneal_langevin_dynamics) from technique 4: the value that brings
    (1 - e/s^2)^(2T) (gamma^2 - 2e / (s^2 - s^2 (1 - e/s^2)^2)) + 2e / (s^2 - s^2 (1 - e/s^2)^2)
    closest to 1, with s = sigma_L and T = n_steps_each. That expression is the variance ratio of technique 4
    for Langevin steps x + e s + sqrt(2e) z, which is the sampler's update with e = step_lr * sigma_i^2 /
    sigma_L^2 (so e / sigma_i^2 = step_lr / sigma_L^2 at every level)."""
    from scipy.optimize import minimize_scalar

    s2 = sigma_end ** 2

    def f(log_eps):
        e = math.exp(log_eps)
        r = 1 - e / s2
        c = 2 * e / (s2 - s2 * r ** 2)
        return abs(r ** (2 * n_steps_each) * (gamma ** 2 - c) + c - 1)

    res = minimize_scalar(f, bounds=(math.log(s2 * 1e-12), math.log(s2 * 0.999)), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x)


def noise_design(config):
    """--noise_design: print the noise levels and Langevin step that techniques 1, 2 and 4 choose for the
    training data and the config's sigma_end and n_steps_each."""
    train_u8 = load_mnist(config.data.root, train=True)
    t0 = time.time()
    sigma_begin, (i, j) = max_pairwise_distance(train_u8.float() / 255)
    dim = config.data.channels * config.data.image_size ** 2
    gamma = noise_ratio_gamma(dim)
    n_levels = num_noise_levels(sigma_begin, config.model.sigma_end, gamma)
    step_lr = langevin_step_lr(config.model.sigma_end, gamma, config.sampling.n_steps_each)
    print(f"largest distance between two of the {len(train_u8)} training images (pixels in [0, 1]): "
          f"{sigma_begin:.4f} (images {i} and {j}; {time.time() - t0:.0f} s)")
    print(f"gamma for D = {dim}: {gamma:.5f}; levels from {sigma_begin:.4f} to {config.model.sigma_end}: "
          f"{n_levels}; step_lr for n_steps_each = {config.sampling.n_steps_each}: {step_lr:.4g}")
    print(f"model: {{sigma_begin: {sigma_begin:.4f}, sigma_end: {config.model.sigma_end}, num_classes: {n_levels}}}")
    print(f"sampling: {{n_steps_each: {config.sampling.n_steps_each}, step_lr: {step_lr:.4g}}}")
    return 0
