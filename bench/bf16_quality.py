"""Does bf16 train the paper's network as well as fp32? Per-level test DSM loss, side by side.

    .venv/bin/python bench/bf16_quality.py --ckpt RUN/logs/DOC/checkpoint.pth --data_root ../shared/data
    .venv/bin/python bench/bf16_quality.py --train --ngf 16 --steps 300 --seeds 1 2 3 --data_root ../shared/data

--ckpt: the same weights evaluated on each path (fp32; bf16 autocast): what bf16 does to the score the sampler
        and the loss see, on the same test images with the same noise at every level (evaluate.test_loss_per_level).
--train: config.yml (batch 128, Adam at 1e-3) at width --ngf, trained --steps steps from each seed once on each
        path (fast.auto off, fast.bf16 false / true, NCHW), then every run's weights scored the same way in fp32.
        The question is whether the bf16 runs land within the fp32 runs' seed-to-seed spread.
Both print a markdown table: the loss at each level and the mean over the levels.
"""
import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import main  # noqa: E402
import schema  # noqa: E402
import speedpath  # noqa: E402
from build import read_trained, trained_network  # noqa: E402
from data import data_space, load_mnist  # noqa: E402
from evaluate import test_loss_per_level  # noqa: E402

EVAL_SEED = 0  # the test noise: the same draws for every path and run


def per_level(ckpt_path, path, data_root, n_images):
    """The per-level test loss of a checkpoint's sampling weights on the speed path `path`."""
    config = schema.load_config(os.path.join(REPO, "config.yml"), [f"data.root={data_root}", "fast.auto=false"])
    run_cfg, ckpt = read_trained(ckpt_path, speedpath.with_path(config, path))
    device = torch.device("cpu")
    score_fn, sigmas = trained_network(run_cfg, ckpt, ckpt_path, device, EVAL_SEED, 100)
    test_u8 = load_mnist(data_root, train=False)[:n_images]
    return test_loss_per_level(score_fn, data_space(run_cfg)[0], test_u8, sigmas, run_cfg.training.anneal_power,
                               EVAL_SEED)


def row(name, losses):
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in losses) + f" | {statistics.mean(losses):.3f} |"


def header(n_levels):
    return ("| weights / path | " + " | ".join(f"level {i + 1}" for i in range(n_levels)) + " | mean |\n|---|" +
            "---|" * (n_levels + 1))


def train_runs(args):
    root = args.out or tempfile.mkdtemp(prefix="bf16_quality_")
    results = {}
    for seed in args.seeds:
        for bf16 in (False, True):
            doc = f"ngf{args.ngf}_s{seed}_{'bf16' if bf16 else 'fp32'}"
            ckpt = os.path.join(root, "logs", doc, "checkpoint.pth")
            if not os.path.exists(ckpt):  # a rerun of this script scores the runs it already has
                sets = [f"model.ngf={args.ngf}", f"training.n_iters={args.steps}", f"data.root={args.data_root}",
                        "fast.auto=false", f"fast.bf16={str(bf16).lower()}", f"training.snapshot_freq={args.steps}",
                        f"training.test_freq={args.steps}"]
                argv = ["--config", os.path.join(REPO, "config.yml"), "--run", root, "--doc", doc, "--seed", str(seed),
                        "--device", "cpu"] + [w for s in sets for w in ("--set", s)]
                assert main.main(argv) == 0, doc
            results[doc] = per_level(ckpt, "fp32", args.data_root, args.n_images)
    print(f"\nngf {args.ngf}, {args.steps} steps, seeds {args.seeds}, scored in fp32 on {args.n_images} test images "
          f"(runs in {root})\n")
    print(header(len(next(iter(results.values())))))
    for doc, losses in results.items():
        print(row(doc, losses))
    for kind in ("fp32", "bf16"):
        means = [statistics.mean(v) for d, v in results.items() if d.endswith(kind)]
        print(f"| {kind}: mean over levels, mean ± std over seeds | {statistics.mean(means):.3f} ± "
              f"{statistics.stdev(means) if len(means) > 1 else 0:.3f} |")


def main_():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="score these weights on the fp32 and the bf16 path")
    p.add_argument("--train", action="store_true", help="train each seed on each path, then score in fp32")
    p.add_argument("--ngf", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--n_images", type=int, default=1000, help="test images scored at each level")
    p.add_argument("--data_root", default=os.path.join(REPO, "run", "datasets"))
    p.add_argument("--out", help="run root of --train (default: a new temporary folder)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    if args.ckpt:
        losses = {path: per_level(args.ckpt, path, args.data_root, args.n_images) for path in ("fp32", "bf16")}
        print(f"\n{args.ckpt}, {args.n_images} test images, the same noise on both paths\n")
        print(header(len(losses["fp32"])))
        for path, values in losses.items():
            print(row(path, values))
        print(row("bf16 - fp32", [b - a for a, b in zip(losses["fp32"], losses["bf16"])]))
    if args.train:
        train_runs(args)


if __name__ == "__main__":
    main_()
