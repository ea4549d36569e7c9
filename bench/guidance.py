"""Classifier guidance measured (docs/results.md#asking-for-a-digit): samples of a trained run asked for a digit at
several guidance scales w, scored by the independent metrics classifier (metrics.py), not the guidance one.

    .venv/bin/python bench/guidance.py --doc quick30 --scales 0 1 2 5 10 20 --digits 3 all -o run/bench/guidance

For each w and each asked digit ("all": one block of n / 10 samples per digit) it draws --n samples with the
run's sampler and seed, s + w grad log p(y | x, sigma_i) (guidance.guided_score_fn), and prints a row: the share
of samples metrics.py's classifier assigns to the asked digit, FID and the Inception-style score against the
test images of that digit (all 10,000 for "all"), the mean top-class confidence, the white share and the
sampling seconds. w = 0 asks for nothing: it is drawn once and scored against each digit, the baseline. The
grids (<digit>_w<w>.png, "all" one row per digit) and results.json go to -o, which must not hold them yet
unless --overwrite is given. FID of 100 samples against ~1,000 images of one digit is biased upwards as every
FID of few samples is (docs/results.md#how-to-read-these-pages): compare rows with each other, not with the
10-digit rows.

    .venv/bin/python bench/guidance.py --doc quick --classifier_only

trains (or loads from its cache) the guidance classifier of the run's noise levels ahead of time, which the first
--sample --digit would otherwise train, and logs its test accuracy per level (docs/results.md#the-guidance-classifier).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import build  # noqa: E402
import checkpoint  # noqa: E402
import devices  # noqa: E402
import guidance  # noqa: E402
import main as cli  # noqa: E402
import metrics  # noqa: E402
import noise  # noqa: E402
import runner  # noqa: E402
from common import NCSNError  # noqa: E402
from data import data_space, load_mnist, load_mnist_labels  # noqa: E402
from rundir import Run, output_paths  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="run", help="output root of the run")
    p.add_argument("--doc", required=True, help="the trained run to sample")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0, 10.0, 20.0], help="scales w")
    p.add_argument("--digits", nargs="+", default=["3", "all"], choices=[str(d) for d in range(10)] + ["all"])
    p.add_argument("--n", type=int, default=100, help="samples a row (a multiple of 10 for 'all')")
    p.add_argument("--seed", type=int, default=1234, help="the sampling seed of every row")
    p.add_argument("--data_root", default=None, help="MNIST root (default: the run's data.root)")
    p.add_argument("-o", "--out", default="run/bench/guidance", help="folder for the grids and results.json")
    p.add_argument("--overwrite", action="store_true", help="replace grids already in -o")
    p.add_argument("--device", default="cpu", type=cli.parse_device, metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps; default cpu (the rows of docs/results.md are CPU rows)")
    p.add_argument("--classifier_only", action="store_true",
                   help="only train (or load) the guidance classifier of the run's noise levels and log its test "
                        "accuracy per level")
    return p.parse_args(argv)


def score_row(images, asked, judge, reference):
    """The metrics of one row: sample_metrics against `reference` and the share of asked digits (N,)."""
    result = metrics.sample_metrics(images, judge, reference)
    _, probs = metrics.classify(judge, images)  # (N, 10)
    result["asked_share"] = float((torch.from_numpy(probs.argmax(1)) == asked).float().mean())
    return result


def classifier_only(run_root, doc, data_root=None):
    """The guidance classifier of run `doc`'s noise levels (noise.config_sigmas of its checkpoint's config), trained
    on the CPU or loaded from its cache; guidance.get_guidance_classifier logs its test accuracy per level."""
    ckpt_path = Run(run_root, doc).ckpt_path
    config = checkpoint.checkpoint_config(checkpoint.load_checkpoint(ckpt_path), ckpt_path)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data_root or config.data.root))
    guidance.get_guidance_classifier(config, noise.config_sigmas(config), "cpu")
    return 0


def bench(args):
    device = devices.resolve_device(args.device)
    ckpt_path = Run(args.run, args.doc).ckpt_path
    run_cfg, score_fn, sigmas, step = build.load_trained(ckpt_path, None, device, args.seed)
    data = dataclasses.replace(run_cfg.data, root=args.data_root or run_cfg.data.root)
    run_cfg = dataclasses.replace(run_cfg, data=data, sampling=dataclasses.replace(run_cfg.sampling, n_samples=args.n))
    names = output_paths(args.out, [f"{d}_w{w:g}.png" for d in args.digits for w in args.scales] + ["results.json"],
                         args.overwrite)
    classifier = guidance.get_guidance_classifier(run_cfg, sigmas, device)
    judge = metrics.get_classifier(data.root, device)
    test_u8, test_y = load_mnist(data.root, train=False), load_mnist_labels(data.root, False)
    references = {d: metrics.reference_stats(judge, metrics.to_unit(test_u8 if d == "all" else
                                                                     test_u8[test_y == int(d)]))
                  for d in args.digits}  # the test images of each asked digit
    to_image = data_space(run_cfg)[1]
    rows, unguided = [], None
    print(f"run {args.doc} (step {step}), {args.n} samples a row, {len(sigmas)} levels x "
          f"{run_cfg.sampling.n_steps_each} steps, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print("| digit | w | asked digit | FID | IS | confidence | white | sampling s |\n|---|---|---|---|---|---|---|---|")
    for w in args.scales:
        for d in args.digits:
            asked = guidance.asked_digits(d, args.n)  # (n,)
            if w == 0 and unguided is not None:
                images, seconds = unguided
            else:
                t0 = time.time()
                samples = runner.draw_samples(
                    score_fn, sigmas, run_cfg, args.n, torch.Generator().manual_seed(args.seed), device,
                    score_for_batch=lambda a, b: guidance.guided_score_fn(score_fn, classifier, asked[a:b], w))
                images, seconds = to_image(samples).clamp(0, 1), time.time() - t0
                if w == 0:
                    unguided = images, seconds
            result = score_row(images, asked, judge, references[d])
            rows.append({"digit": d, "w": w, "seconds": seconds, **result})
            print(f"| {d} | {w:g} | {100 * result['asked_share']:.0f}% | {result['fid']:.1f} | "
                  f"{result['inception_score']:.2f} | {result['mean_confidence']:.3f} | "
                  f"{100 * result['white_share']:.0f}% | {seconds:.0f} |", flush=True)
            from torchvision.utils import save_image
            save_image(images, names[f"{d}_w{w:g}.png"], padding=2,
                       nrow=args.n // guidance.N_DIGITS if d == "all" else math.ceil(math.sqrt(args.n)))
    with open(names["results.json"], "w") as f:
        json.dump({"doc": args.doc, "step": step, "n": args.n, "seed": args.seed, "rows": rows}, f, indent=1)
    return 0


def main(argv=None):
    args = parse_args(argv)
    cli.setup_logging("info")
    try:
        return classifier_only(args.run, args.doc, args.data_root) if args.classifier_only else bench(args)
    except NCSNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
