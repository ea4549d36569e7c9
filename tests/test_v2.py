"""The NCSNv2 switches: EMA, the noise-design rules, the final denoising step, inpainting; and consistent sampling."""
import math
import os

import pytest
import yaml
import torch
from scipy.spatial.distance import pdist
from scipy.stats import norm

import main
import data
import inpaint
import noise
import runner
from common import read_scalars
from conftest import CPU, REPO, event_files, scalars_of_new_event_files, tiny_config, write_config
from test_method import gaussian_score


def test_ema_update_is_the_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = runner.make_ema(model)
    p0 = [p.detach().clone() for p in model.parameters()]
    rate, values = 0.9, []
    for k in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # theta_k = theta_0 + k + 1
        runner.ema_update(ema, model, rate)
        values.append(k + 1)
    # ema_5 = rate^5 theta_0 + sum_k (1 - rate) rate^(5 - k) (theta_0 + k)
    expected_shift = sum((1 - rate) * rate ** (5 - k) * k for k in values)
    for e, p in zip(ema.parameters(), p0):
        torch.testing.assert_close(e, p + expected_shift)
        assert not e.requires_grad


def test_noise_rules_against_hand_computed_values():
    g = noise.noise_ratio_gamma(784)
    c = math.sqrt(2 * 784)
    assert norm.cdf(c * (g - 1) + 3 * g) - norm.cdf(c * (g - 1) - 3 * g) == pytest.approx(0.5, abs=1e-9)
    assert g == pytest.approx(1.082, abs=0.001)  # by hand: the equation gives 0.528 at 1.080 and 0.456 at 1.085
    # 1 + log(16.9 / 0.01) / log(1.082) = 95.3: 96 levels, as configs/ncsnv2.yml has
    assert noise.num_noise_levels(16.9, 0.01, 1.082) == 96
    assert noise.num_noise_levels(1.0, 0.01, 0.01 ** (-1 / 9)) == 10  # the v1 geometric sequence
    def f(eps, T, s=0.01):  # technique 4's expression, written out again
        r = 1 - eps / s ** 2
        cterm = 2 * eps / (s ** 2 - s ** 2 * r ** 2)
        return r ** (2 * T) * (g ** 2 - cterm) + cterm

    for T in (5, 100):
        eps = noise.langevin_step_lr(0.01, g, T)
        assert 0 < eps < 0.01 ** 2
        # the rule picks the eps that brings f closest to 1: any other eps does worse
        assert all(abs(f(eps, T) - 1) <= abs(f(eps * k, T) - 1) for k in (0.5, 0.9, 0.99, 1.01, 1.1, 2))
    assert abs(f(noise.langevin_step_lr(0.01, g, 100), 100) - 1) < 0.02  # 100 steps get close to 1
    assert noise.langevin_step_lr(0.01, g, 100) < noise.langevin_step_lr(0.01, g, 5)  # more steps, smaller


def test_max_pairwise_distance_matches_brute_force():
    x = torch.rand(300, 20) * torch.linspace(0.1, 3, 20)
    d, (i, j) = noise.max_pairwise_distance(x, chunk=64)
    assert d == pytest.approx(pdist(x.double().numpy()).max(), rel=1e-12)
    assert d == pytest.approx(float((x[i].double() - x[j].double()).norm()), rel=1e-12)


def test_denoising_step_is_tweedie_on_the_last_level():
    sigmas = torch.tensor([1.0, 0.3])
    score = gaussian_score(0.5, 0.2, sigmas)
    x0 = torch.rand(64, 1, 4, 4)
    last = []
    out = runner.anneal_langevin_dynamics(score, x0, sigmas, 3, 1e-3, torch.Generator().manual_seed(0),
                                          callback=lambda i, t, x: last.append(x.clone()), denoise=True)
    x = last[-1]
    # x + sigma_L^2 s(x) with the exact score is E[x_0 | x] = mu + s0^2 / (s0^2 + sigma_L^2) (x - mu)
    torch.testing.assert_close(out, x + 0.3 ** 2 * score(x, torch.ones(64, dtype=torch.long)))
    torch.testing.assert_close(out, 0.5 + 0.04 / (0.04 + 0.09) * (x - 0.5))
    plain = runner.anneal_langevin_dynamics(score, x0, sigmas, 3, 1e-3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, x)


@pytest.mark.parametrize("kind", ["bottom", "right", "square", "random"])
def test_inpainting_never_changes_the_known_pixels(kind):
    g = torch.Generator().manual_seed(0)
    known = torch.rand(5, 1, 28, 28, generator=g)
    mask = inpaint.inpainting_mask(kind, known.shape, g)
    assert 0 < mask.float().mean() < 1
    net = torch.nn.Conv2d(1, 1, 3, padding=1)  # any score at all: the known pixels must still come back exactly
    out = runner.anneal_langevin_dynamics(lambda x, y: net(x) * 10, torch.rand(known.shape, generator=g),
                                          torch.tensor([1.0, 0.1]), 4, 1e-3, g, known=known, mask=mask,
                                          denoise=True)
    assert torch.equal(out[mask], known[mask])
    assert not torch.equal(out[~mask], known[~mask])


def test_ema_run_checkpoints_resumes_and_samples_with_ema(tmp_path, fake_mnist):
    cfg = tiny_config(fake_mnist, **{"model.ema": True, "model.ema_rate": 0.9, "training.n_iters": 6,
                                     "training.snapshot_freq": 3})
    path = write_config(tmp_path / "c.yml", cfg)
    run = ["--run", str(tmp_path / "run")]
    assert main.main([*CPU, "--config", path, *run, "--doc", "full"]) == 0
    half = write_config(tmp_path / "h.yml", {**cfg, "training": {**cfg["training"], "n_iters": 3}})
    assert main.main([*CPU, "--config", half, *run, "--doc", "half"]) == 0
    before = event_files(tmp_path / "run/tensorboard/half")
    # resumed with another --seed: the run keeps its checkpoint's seed and must still end equal to "full"
    assert main.main([*CPU, "--config", path, *run, "--doc", "half", "--resume_training", "--seed", "7"]) == 0
    a = torch.load(tmp_path / "run/logs/full/checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "run/logs/half/checkpoint.pth", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["seed"] == a["seed"] and b["step"] == 6
    # the resuming process trained steps 4..6 only: its own event file holds the loss of no earlier step
    new, resumed = scalars_of_new_event_files(tmp_path / "run/tensorboard/half", before, tmp_path / "resumed_tb")
    assert len(new) == 1, new
    logged = sorted(resumed["train_loss/raw"])
    assert logged == [4, 5, 6], f"the resumed process logged steps {logged}"
    full_loss = read_scalars(tmp_path / "run/tensorboard/full")["train_loss/raw"]
    assert resumed["train_loss/raw"] == {k: full_loss[k] for k in (4, 5, 6)}
    assert not torch.equal(a["ema"]["end_conv.weight"], a["model"]["end_conv.weight"])
    # sampling uses the EMA weights unless sampling.ema is off
    assert main.main([*CPU, *run, "--doc", "full", "--sample", "-o", str(tmp_path / "ema")]) == 0
    raw = write_config(tmp_path / "raw.yml", {**cfg, "sampling": {**cfg["sampling"], "ema": False}})
    assert main.main([*CPU, "--config", raw, *run, "--doc", "full", "--sample", "-o", str(tmp_path / "raw")]) == 0
    s_ema = torch.load(tmp_path / "ema" / "samples.pt", weights_only=True)
    s_raw = torch.load(tmp_path / "raw" / "samples.pt", weights_only=True)
    assert not torch.equal(s_ema, s_raw)


def test_inpaint_and_noise_design_commands(tmp_path, fake_mnist, capsys):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 2}))
    run = ["--run", str(tmp_path / "run")]
    assert main.main([*CPU, "--config", cfg, *run, "--doc", "i"]) == 0
    assert main.main([*CPU, *run, "--doc", "i", "--inpaint", "square", "-o", str(tmp_path / "o")]) == 0
    import numpy as np
    from PIL import Image
    png = Image.open(tmp_path / "o" / "inpaint_square.png")
    assert png.size == (4 * 30 + 2, 3 * 30 + 2)  # 4 digits, 3 rows: originals, what the sampler sees, completions
    grid = np.asarray(png.convert("L")).astype(int)
    known = np.ones((28, 28), bool)
    known[7:21, 7:21] = False  # the square mask hides the centre
    for k in range(4):
        cell = lambda row: grid[2 + 30 * row:30 + 30 * row, 2 + 30 * k:30 + 30 * k]  # noqa: E731
        assert (cell(2)[known] == cell(0)[known]).all(), f"digit {k}: the completion changed known pixels"
        assert (cell(1)[~known] == 128).all()  # the hidden square, grey, as the sampler sees it
    capsys.readouterr()
    assert main.main([*CPU, "--config", cfg, *run, "--noise_design"]) == 0
    out = capsys.readouterr().out
    train = data.load_mnist(fake_mnist, train=True).float() / 255
    d = pdist(train.flatten(1).double().numpy()).max()
    assert f"num_classes: {noise.num_noise_levels(d, 0.01, noise.noise_ratio_gamma(784))}" in out
    assert f"sigma_begin: {d:.4f}" in out


def coupled_gaussian_score(mu, s0, c, sigmas):
    """The exact score of N(mu 1, s0^2 I + c^2 1 1^T) (every pixel shares one N(0, c^2) offset) convolved with
    N(0, sigma_i^2 I): -(a I + c^2 1 1^T)^-1 (x - mu) with a = s0^2 + sigma_i^2 (Sherman-Morrison)."""
    def score(x, labels):
        a = s0 ** 2 + sigmas[labels].view(-1, 1, 1, 1) ** 2
        d = (x - mu)
        D = x[0].numel()
        return -(d - c ** 2 * d.sum(dim=(1, 2, 3), keepdim=True) / (a + D * c ** 2)) / a
    return score


def test_inpainting_conditions_every_step_on_the_noisy_known_pixels():
    # 4x4 images whose pixels share one offset: N(0.5, 0.1^2 I + 0.3^2 1 1^T). The left half is known (0.9).
    sigmas = torch.tensor([1.0, 0.3, 0.1])
    mu, s0, c, B = 0.5, 0.1, 0.3, 1000
    score = coupled_gaussian_score(mu, s0, c, sigmas)
    known = torch.full((B, 1, 4, 4), 0.9)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    seen = {}

    def record(i, t, x):
        seen.setdefault(i, []).append((x - known)[mask.expand_as(x)].clone())

    x0 = torch.rand(known.shape, generator=torch.Generator().manual_seed(1))
    out = runner.anneal_langevin_dynamics(score, x0, sigmas, 30, 5e-3, torch.Generator().manual_seed(2),
                                          callback=record, known=known, mask=mask)
    assert sorted(seen) == [0, 1, 2] and all(len(v) == 30 for v in seen.values())
    z_levels = []
    for i, sigma in enumerate(sigmas.tolist()):
        first = seen[i][0]
        # at every step of level i the known pixels are known + sigma_i z': one z' for the whole level ...
        for t, r in enumerate(seen[i]):
            assert torch.equal(r, first), f"level {i} step {t}: the known pixels moved within the level"
        z = first / sigma
        assert z.mean().abs() < 0.05 and z.std().item() == pytest.approx(1.0, abs=0.05), (i, z.std())
        z_levels.append(z)
    # ... and a fresh z' at every level
    for i in range(len(z_levels) - 1):
        assert torch.corrcoef(torch.stack([z_levels[i], z_levels[i + 1]]))[0, 1].abs() < 0.05
    assert torch.equal(out[mask.expand_as(out)], known[mask.expand_as(out)])

    # the known pixels pull the unknown ones: E[x_U | x_K~] for the noised Gaussian at sigma_L, against a run
    # with nothing known (mean mu)
    k, a = int(mask.sum()), s0 ** 2 + float(sigmas[-1]) ** 2
    expected = mu + c ** 2 * k * (0.9 - mu) / (a + k * c ** 2)  # 0.889
    unknown = out[~mask.expand_as(out)]
    free = runner.anneal_langevin_dynamics(score, x0, sigmas, 30, 5e-3, torch.Generator().manual_seed(2),
                                           known=known, mask=torch.zeros_like(mask))
    assert free.mean().item() == pytest.approx(mu, abs=0.08)  # the shared offset mixes slowly: a wider band
    assert unknown.mean().item() == pytest.approx(expected, abs=0.03), \
        f"mean of the inpainted pixels {unknown.mean().item():.3f}, expected {expected:.3f} (nothing known: {mu})"


def test_langevin_step_rule_on_the_real_sampler():
    # Technique 4 checked by simulation, not by re-typing its formula: the real sampler, one level sigma_L, with
    # the exact score of a point mass at 0 noised by sigma_L (-x / sigma_L^2), started at N(0, (gamma sigma_L)^2)
    # (the spread the previous level leaves): after T steps at the rule's step_lr the samples have variance
    # close to sigma_L^2, and other step sizes, on the same random numbers, end farther from it.
    s, T = 0.01, 50
    gamma = noise.noise_ratio_gamma(784)
    step_lr = noise.langevin_step_lr(s, gamma, T)

    def variance_ratio(lr):
        g = torch.Generator().manual_seed(0)
        x = gamma * s * torch.randn(4000, 1, 8, 8, generator=g)  # 256,000 one-dimensional chains
        out = runner.anneal_langevin_dynamics(lambda x, labels: -x / s ** 2, x, torch.tensor([s]), T, lr, g)
        return (out.double().pow(2).mean() / s ** 2).item()

    best = variance_ratio(step_lr)
    assert best == pytest.approx(1.0, abs=0.05), best
    for k in (1 / 3, 3):
        other = variance_ratio(step_lr * k)
        assert abs(other - 1) > abs(best - 1) + 0.02, f"step_lr x {k:.3g}: ratio {other:.4f}, the rule's {best:.4f}"
    for k in (1 / 1.5, 1.5):  # the rule's step is the best one, also against nearer ones
        other = variance_ratio(step_lr * k)
        assert abs(other - 1) > abs(best - 1), f"step_lr x {k:.3g}: ratio {other:.4f}, the rule's {best:.4f}"


def test_consistent_sampler_through_sample_and_its_refusals(tmp_path, fake_mnist, capfd):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 2})
    run = ["--run", str(tmp_path / "run")]
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), *run, "--doc", "c"]) == 0
    cas = {**cfg, "sampling": {**cfg["sampling"], "sampler": "consistent", "step_lr": 8e-5, "n_frames": 3}}
    path = write_config(tmp_path / "cas.yml", cas)
    assert main.main([*CPU, "--config", path, *run, "--doc", "c", "--sample", "-o", str(tmp_path / "cas")]) == 0
    samples = torch.load(tmp_path / "cas" / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()
    from PIL import Image
    assert Image.open(tmp_path / "cas" / "movie.gif").n_frames == 3  # of its (4 - 1) x 2 steps, the last included
    # it is its own chain: the same seed under Algorithm 1 draws other samples
    lang = write_config(tmp_path / "lang.yml", {**cas, "sampling": {**cas["sampling"], "sampler": "langevin"}})
    assert main.main([*CPU, "--config", lang, *run, "--doc", "c", "--sample", "-o", str(tmp_path / "lang")]) == 0
    assert not torch.equal(torch.load(tmp_path / "lang" / "samples.pt", weights_only=True), samples)
    # a step it cannot take (eta = 2e-5 / 0.01^2 = 0.2, below 1 - 1 / 2.15) and --inpaint: one line, nothing written
    small = write_config(tmp_path / "small.yml", {**cas, "sampling": {**cas["sampling"], "step_lr": 2e-5}})
    capfd.readouterr()
    assert main.main([*CPU, "--config", small, *run, "--doc", "c", "--sample", "-o", str(tmp_path / "small")]) == 1
    assert not (tmp_path / "small").exists()
    assert "sampling.step_lr 2e-05 is outside" in capfd.readouterr().err
    assert main.main([*CPU, "--config", path, *run, "--doc", "c", "--inpaint", "square", "-o", str(tmp_path / "i")]) == 1
    assert not (tmp_path / "i").exists()
    assert "--inpaint runs annealed Langevin dynamics only" in capfd.readouterr().err


def test_ncsnv2_yml_states_the_settings_it_runs_with_that_ncsnv2_does_not_use():
    """configs/ncsnv2.yml runs two of this repository's settings, not NCSNv2's: it states both, each with a comment
    naming NCSNv2's value, instead of inheriting them from the schema unsaid."""
    with open(os.path.join(REPO, "configs", "ncsnv2.yml")) as f:
        text = f.read()
    raw = yaml.safe_load(text)
    assert raw["sampling"]["init"] == "gaussian" and raw["model"]["ema_warmup"] is True
    for key, ncsnv2 in (("init: gaussian", "init: uniform"), ("ema_warmup: true", "ema_warmup: false")):
        line = next(line for line in text.splitlines() if line.strip().startswith(key))
        assert "not NCSNv2's" in line and ncsnv2 in line, line
