"""Sample quality of a small NCSN trained briefly on the CPU, through the repository's own commands.

    .venv/bin/python bench/quality.py --data_root ../shared/data                  # v1, small, 400 steps
    .venv/bin/python bench/quality.py --data_root ../shared/data --reference      # the two reference rows
    .venv/bin/python bench/quality.py --data_root ../shared/data --seeds 1 2 --set fast.bf16=false ...

For each seed it writes a config (the --config file with the size flags and --set overrides applied), trains
it with `main.py` into run/bench/<stamp>-<seed>, then scores it with `main.py --eval` once per --eval_variant
(a name and sampling overrides, e.g. "EMA+denoise:sampling.ema=true,sampling.denoise=true"), and prints FID,
the Inception-style score (IS), confidence and the time of each part. FID is on the 128 features of the
repository's MNIST classifier (metrics.py), against the 10,000 test images; it compares runs of this project,
and only at the same number of samples: FID from few samples is biased upwards (100 real training digits
score 41.5 where 10,000 score 1.74; `--reference --n_reference 100` shows it). The defaults (400 steps at
ngf 16, 100 samples with the paper's 100 Langevin steps a level) took 15 minutes on one busy CPU core.
Real MNIST can be given with --data_root (for example ../shared/data on this project's machines).
"""
import argparse
import json
import os
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import main  # noqa: E402
import metrics  # noqa: E402
import data  # noqa: E402
from common import read_scalars  # noqa: E402


def parse_value(text):
    return yaml.safe_load(text)  # 1 -> int, 1.0 -> float, true -> bool, else str


def overrides(pairs):
    """['a.b=1', 'c.d=x'] or 'a.b=1,c.d=x' -> {('a', 'b'): 1, ('c', 'd'): 'x'}"""
    out = {}
    for pair in pairs:
        for item in filter(None, pair.split(",")):
            key, _, value = item.partition("=")
            section, _, name = key.strip().partition(".")
            out[(section, name)] = parse_value(value)
    return out


def bench_config(args, seed_root):
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    sets = {("training", "n_iters"): args.steps, ("training", "batch_size"): args.batch_size,
            ("training", "snapshot_freq"): args.steps, ("training", "test_freq"): max(1, args.steps // 10),
            ("model", "ngf"): args.ngf, ("data", "root"): args.data_root,
            ("sampling", "n_steps_each"): args.n_steps_each, ("sampling", "batch_size"): args.sample_batch,
            ("eval", "n_samples_cpu"): args.n_samples, ("eval", "n_samples"): args.n_samples,
            ("eval", "loss_images_cpu"): args.loss_images, ("eval", "loss_images"): args.loss_images}
    sets.update(overrides(args.set))
    for (section, name), value in sets.items():
        cfg.setdefault(section, {})[name] = value
    path = os.path.join(seed_root, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg


def reference_rows(args):
    """MNIST training images (the floor) and U[0, 1] noise (the ceiling), scored like samples."""
    classifier = metrics.get_classifier(args.data_root, "cpu")
    train_u8 = data.load_mnist(args.data_root, train=True)
    test_u8 = data.load_mnist(args.data_root, train=False)
    reference = metrics.reference_stats(classifier, metrics.to_unit(test_u8))
    g = torch.Generator().manual_seed(args.seeds[0])
    pick = torch.randperm(len(train_u8), generator=g)[:args.n_reference]
    rows = [("MNIST train images vs test", metrics.sample_metrics(metrics.to_unit(train_u8[pick]), classifier,
                                                                   reference)),
            ("U[0, 1] noise", metrics.sample_metrics(torch.rand(args.n_reference, 1, 28, 28, generator=g),
                                                     classifier, reference))]
    print(f"\n| set | n | FID | IS | confidence |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n_images']} | {r['fid']:.2f} | {r['inception_score']:.2f} | "
              f"{r['mean_confidence']:.3f} |")


def main_bench(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "config.yml"))
    p.add_argument("--data_root", default="run/datasets", help="MNIST in <data_root>/MNIST/raw")
    p.add_argument("--reference", action="store_true", help="only the reference rows")
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--ngf", type=int, default=16, help="RefineNet width (64 in the paper)")
    p.add_argument("--batch_size", type=int, default=64, help="training batch")
    p.add_argument("--n_samples", type=int, default=100, help="samples scored by each --eval")
    p.add_argument("--sample_batch", type=int, default=100, help="sampling batch")
    p.add_argument("--loss_images", type=int, default=500, help="test images in the per-level DSM loss")
    p.add_argument("--n_steps_each", type=int, default=100, help="Langevin steps per level (the paper's 100: "
                   "with 5 the chain does not get from U[0, 1] to digits and every FID is noise-sized)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.ema=true fast.bf16=false")
    p.add_argument("--eval_variant", action="append", default=None,
                   help="NAME:KEY=VALUE,...: one --eval with these sampling overrides (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help="one training run per seed")
    p.add_argument("--n_reference", type=int, default=10000, help="images in each reference row")
    p.add_argument("--out", default="run/bench", help="where the runs go")
    args = p.parse_args(argv)
    if args.reference:
        reference_rows(args)
        return 0
    variants = [v.partition(":")[::2] for v in (args.eval_variant or ["as configured:"])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        root = os.path.join(args.out, f"{stamp}-{seed}")
        os.makedirs(root)
        cfg_path, cfg = bench_config(args, root)
        common = ["--run", root, "--doc", "q", "--seed", str(seed), "--verbose", "warning"]
        t = time.time()
        if main.main(["--config", cfg_path, *common]) != 0:
            return 1
        train_s = time.time() - t
        loss = read_scalars(os.path.join(root, "tensorboard", "q"))["loss"]
        final_loss = sum(loss[s] for s in sorted(loss)[-20:]) / min(20, len(loss))
        for name, sets in variants:
            vcfg = json.loads(json.dumps(cfg))
            for (section, key), value in overrides([sets]).items():
                vcfg.setdefault(section, {})[key] = value
            vpath = os.path.join(root, f"eval-{len(rows)}.yml")
            with open(vpath, "w") as f:
                yaml.safe_dump(vcfg, f, sort_keys=False)
            t = time.time()
            if main.main(["--config", vpath, *common, "--eval"]) != 0:
                return 1
            eval_s = time.time() - t
            with open(os.path.join(root, "logs", "q", "metrics.json")) as f:
                r = json.load(f)[-1]
            rows.append((name, seed, r, train_s, final_loss, eval_s))
    print(f"\n{args.steps} steps at ngf {args.ngf}, batch {args.batch_size}; {args.n_samples} samples, "
          f"{args.n_steps_each} Langevin steps a level; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | seed | FID | IS | confidence | final train loss | train s | sampling s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seed, r, train_s, final_loss, eval_s in rows:
        print(f"| {name} | {seed} | {r['fid']:.1f} | {r['inception_score']:.2f} | {r['mean_confidence']:.3f} | "
              f"{final_loss:.2f} | {train_s:.0f} | {r['sampling_seconds']:.0f} | {eval_s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
