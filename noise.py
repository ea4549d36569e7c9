"""NCSNv2's noise design (Song & Ermon, 2020, "Improved Techniques for Training Score-Based Generative
Models"): the largest noise level, the ratio of consecutive levels, their number and the Langevin step size,
and the `--noise_design` command that prints them for the training data. Its own module: it chooses the
config's numbers, and sampling does not call it; training calls `langevin_step_lr` for the step size of the
snapshot grid (training.snapshot_grid, runner.snapshot_grid_sampling)."""
import math
import time

from data import load_mnist

SIGMA_1_CHUNK = 4096  # rows per block of the pairwise-distance search
COVERAGE_STDS = 3  # technique 2 compares the level-to-level overlap within 3 standard deviations
OVERLAP = 0.5  # ... and asks for this much of it


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
