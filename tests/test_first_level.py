"""bench/first_level.py's probe runs exactly the sampler's first level (the README's white-sample table rests on it)."""
import os
import sys

import torch

from noise import get_sigmas
from runner import anneal_langevin_dynamics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from first_level import first_level  # noqa: E402


def test_first_level_is_the_full_samplers_chain_after_level_one():
    sigmas = get_sigmas(1.0, 0.01, 10)

    def score(x, labels):  # a level-dependent score, so that running the wrong level would show
        return -(x - 0.3) / (0.2 + sigmas[labels].view(-1, 1, 1, 1) ** 2)

    x0 = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    after_level_one = []
    anneal_langevin_dynamics(score, x0, sigmas, 7, 2e-5, torch.Generator().manual_seed(9),
                             callback=lambda i, t, x: after_level_one.append(x.clone()) if (i, t) == (0, 6) else None)
    probed = first_level(score, x0, sigmas, 7, 2e-5, torch.Generator().manual_seed(9))
    torch.testing.assert_close(probed, after_level_one[0], rtol=1e-6, atol=1e-6)
