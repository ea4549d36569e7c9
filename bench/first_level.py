"""Where white samples are decided: the chain after the sampler's first noise level, from each start.

    .venv/bin/python bench/first_level.py run/logs/defect/checkpoint_500.pth run/logs/defect/checkpoint_1500.pth
    .venv/bin/python bench/first_level.py run/logs/defect/checkpoint.pth --ema --n 40

For each checkpoint (its own model and sampling settings; the raw weights unless --ema) and each start of
`sampling.init` (uniform: U[0, 1], the paper's; gaussian: MNIST's mean pixel + sigma_1 z), this runs the first
level of annealed Langevin dynamics only (n_steps_each steps at alpha_1 = step_lr sigma_1^2 / sigma_L^2, as
`--sample` does) and prints the median mean pixel of the chains and the share already white (mean pixel >
metrics.WHITE_MEAN). At sigma_1 the chain should hold noisy digits: mean pixel about 0.13 +- 0.04. Chains that
leave this level bright stay bright: the later, smaller levels cannot move a whole background, so this share
predicts the white share of the finished samples at a fraction of the cost (about two minutes for 40 chains per
start at ngf 32 on 2 CPU cores, against half an hour for the whole sampler). The table of
docs/results.md#where-it-is-decided-the-first-level was made with it.
"""
import argparse
import dataclasses
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import build  # noqa: E402
import devices  # noqa: E402
import main as cli  # noqa: E402
import checkpoint  # noqa: E402
import runner  # noqa: E402
from common import NCSNError  # noqa: E402
from data import data_space  # noqa: E402
from metrics import WHITE_MEAN  # noqa: E402
from schema import SAMPLING_INITS  # noqa: E402


def first_level(score_fn, x0, sigmas, n_steps_each, step_lr, generator):
    """The chain x0 (B, 1, 28, 28) after the first level of runner.anneal_langevin_dynamics: the sampler itself,
    given the one level sigma_1 and the step_lr that makes its step the full schedule's alpha_1."""
    step_lr_1 = step_lr * float(sigmas[0] / sigmas[-1]) ** 2  # alpha_1 = step_lr_1 * (sigma_1 / sigma_1)^2
    return runner.anneal_langevin_dynamics(score_fn, x0, sigmas[:1], n_steps_each, step_lr_1, generator)


def probe(path, use_ema, n, seed, device):
    """(step, {start: (median mean pixel, white share)}) of n chains after the first level, for the checkpoint
    `path` loaded as --sample loads it: its own sampling settings, in fp32 and uncompiled, raw or EMA weights."""
    cfg = checkpoint.checkpoint_config(checkpoint.load_checkpoint(path), path)
    if use_ema and not cfg.model.ema:
        raise SystemExit(f"{path} holds no EMA weights (model.ema was off)")
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, ema=use_ema),
                              fast=dataclasses.replace(cfg.fast, compile=False, bf16=False))
    cfg, score_fn, sigmas, step = build.load_trained(path, cfg, device, seed)
    to_image = data_space(cfg)[1]
    out = {}
    for start in SAMPLING_INITS:
        start_cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, init=start))
        g = torch.Generator(device).manual_seed(seed)
        x0 = runner.initial_samples(start_cfg, sigmas, n, g, device)
        x = first_level(score_fn, x0, sigmas, cfg.sampling.n_steps_each, cfg.sampling.step_lr, g)
        means = to_image(x).flatten(1).mean(1)  # (n,) mean pixel, not clamped: the level's noise is symmetric
        out[start] = (float(means.median()), float((means > WHITE_MEAN).float().mean()))
    return step, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (run/logs/<doc>/checkpoint_<step>.pth)")
    p.add_argument("--ema", action="store_true", help="the EMA weights instead of the raw ones")
    p.add_argument("--n", type=int, default=40, help="chains per start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", type=cli.parse_device, metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps; default cpu (the rows of docs/results.md are CPU rows)")
    args = p.parse_args(argv)
    try:
        device = devices.resolve_device(args.device)
    except NCSNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"first level of the sampler, {args.n} chains per start, {'EMA' if args.ema else 'raw'} weights, on "
          f"{device}, {torch.get_num_threads()} threads")
    print("| checkpoint | step | U[0, 1] start: mean pixel | white | gaussian start: mean pixel | white | s |")
    print("|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        t0 = time.perf_counter()
        step, r = probe(path, args.ema, args.n, args.seed, device)
        (mu_u, w_u), (mu_g, w_g) = r["uniform"], r["gaussian"]
        print(f"| {path} | {step} | {mu_u:.3f} | {w_u:.0%} | {mu_g:.3f} | {w_g:.0%} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
