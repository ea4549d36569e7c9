"""EMA warm-up and the sampler's start: the two remedies for white samples after short runs."""
import dataclasses

import pytest
import torch

import noise
import runner
from data import MNIST_MEAN
from schema import load_config
from conftest import REPO


def ema_share_of_init(steps, rate, warmup):
    """The weight that the EMA still gives the initial parameters after `steps` updates, measured through
    runner.ema_update: a parameter at 0 that training moves to 1 at the first step and keeps there."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = runner.make_ema(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(1, steps + 1):
        runner.ema_update(ema, model, runner.ema_decay(step, rate, warmup))
    return 1.0 - ema.weight.item()


def test_ema_warmup_forgets_the_random_start_where_a_plain_ema_keeps_a_fifth_of_it():
    assert ema_share_of_init(1500, 0.999, warmup=False) == pytest.approx(0.999 ** 1500, rel=1e-3)  # 22%
    assert ema_share_of_init(1500, 0.999, warmup=True) < 1e-6
    assert runner.ema_decay(1, 0.999, True) == pytest.approx(0.1)  # the first update takes 90% of the weights
    assert runner.ema_decay(20000, 0.999, True) == 0.999  # and the rate is reached in the end
    assert runner.ema_decay(1, 0.999, False) == 0.999


def test_initial_samples_uniform_and_gaussian():
    cfg = load_config(f"{REPO}/config.yml")
    sigmas = noise.get_sigmas(1.0, 0.01, 10)
    g = torch.Generator().manual_seed(0)
    uniform = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, init="uniform"))
    u = runner.initial_samples(uniform, sigmas, 2000, g, "cpu")
    assert u.shape == (2000, 1, 28, 28) and u.min() >= 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    gauss = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, init="gaussian"))
    x = runner.initial_samples(gauss, sigmas * 3, 2000, g, "cpu")  # sigma_1 = 3
    assert x.mean().item() == pytest.approx(MNIST_MEAN, abs=0.01)
    assert x.std().item() == pytest.approx(3.0, rel=0.01)
