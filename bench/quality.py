"""Sample quality of NCSN trained on the CPU, through the repository's own commands (main.py and --eval).

    .venv/bin/python bench/quality.py --config configs/quick.yml --data_root ../shared/data      # the recipe
    .venv/bin/python bench/quality.py --config configs/quick.yml --data_root ../shared/data --snapshots
    .venv/bin/python bench/quality.py --data_root ../shared/data --steps 400 --ngf 16 --batch_size 64
    .venv/bin/python bench/quality.py --data_root ../shared/data --reference      # the two reference rows
    .venv/bin/python bench/quality.py --config configs/quick.yml --seeds 1 2 3 --set fast.bf16=true

For each seed it writes a config (the --config file, with --steps/--ngf/--batch_size/--n_steps_each where
given and the --set overrides applied), trains it with `main.py` into run/bench/<stamp>-<seed>, then scores it
with `main.py --eval --ckpt STEP` once per --eval_variant (a name and sampling overrides, e.g.
"T=30:sampling.n_steps_each=30,sampling.step_lr=8e-6") and, with --snapshots, at every numbered snapshot
too (the time-quality curve of one run). Each row gives FID, the Inception-style score (IS), the mean top-class
confidence, the range of the ten digit shares, the share of white samples (mean pixel > 0.5: white
backgrounds, not digits), the final training loss, and the seconds of training (up to that snapshot), sampling
and the whole --eval. FID is on the 128 features of the repository's MNIST classifier (metrics.py), against the
10,000 test images; it compares runs of this repository, and only at the same number of samples: 100 real
training digits score 41.5 where 10,000 score 1.74 (`--reference --n_reference 100`).
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

import devices  # noqa: E402
import main  # noqa: E402
import metrics  # noqa: E402
import schema  # noqa: E402
import data  # noqa: E402
from common import NCSNError, numbered_snapshots, read_scalars  # noqa: E402


def split_sets(pairs):
    """['a.b=1', 'c.d=x,e.f=2'] -> ['a.b=1', 'c.d=x', 'e.f=2']: --set and --eval_variant take comma lists."""
    return [item.strip() for pair in pairs for item in pair.split(",") if item.strip()]


def bench_config(args, seed_root):
    cfg = schema.read_yaml(args.config)
    sets = {("data", "root"): args.data_root, ("sampling", "batch_size"): args.sample_batch,
            ("eval", "n_samples"): args.n_samples, ("eval", "loss_images"): args.loss_images}
    if args.steps is not None:
        sets.update({("training", "n_iters"): args.steps, ("training", "snapshot_freq"): args.steps,
                     ("training", "test_freq"): max(1, args.steps // 10)})
    for key, value in ((("training", "batch_size"), args.batch_size), (("model", "ngf"), args.ngf),
                       (("sampling", "n_steps_each"), args.n_steps_each)):
        if value is not None:
            sets[key] = value
    for (section, name), value in sets.items():
        cfg.setdefault(section, {})[name] = value
    cfg = schema.apply_sets(cfg, split_sets(args.set))  # as main.py --set reads them (1e-5 is a number)
    path = os.path.join(seed_root, "config.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path, cfg


def reference_rows(args):
    """MNIST training images (the floor) and U[0, 1] noise (the ceiling), scored like samples."""
    classifier = metrics.get_classifier(args.data_root, devices.resolve_device(args.device))
    train_u8 = data.load_mnist(args.data_root, train=True)
    test_u8 = data.load_mnist(args.data_root, train=False)
    reference = metrics.reference_stats(classifier, metrics.to_unit(test_u8))
    g = torch.Generator().manual_seed(args.seeds[0])
    pick = torch.randperm(len(train_u8), generator=g)[:args.n_reference]
    rows = [("MNIST train images vs test", metrics.sample_metrics(metrics.to_unit(train_u8[pick]), classifier,
                                                                   reference)),
            ("U[0, 1] noise", metrics.sample_metrics(torch.rand(args.n_reference, 1, 28, 28, generator=g),
                                                     classifier, reference))]
    print("\n| set | n | FID | KID (± se) | IS | confidence |\n|---|---|---|---|---|---|")
    for name, r in rows:
        kid = "n/a" if r["kid"] is None else metrics.kid_text(r["kid"], r["kid_se"], "±")
        print(f"| {name} | {r['n_images']} | {r['fid']:.2f} | {kid} | {r['inception_score']:.2f} | "
              f"{r['mean_confidence']:.3f} |")


def main_bench(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "config.yml"))
    p.add_argument("--data_root", default="run/datasets", help="MNIST in <data_root>/MNIST/raw")
    p.add_argument("--reference", action="store_true", help="only the reference rows")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's n_iters)")
    p.add_argument("--ngf", type=int, default=None, help="RefineNet width (default: the config's)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default: the config's)")
    p.add_argument("--n_samples", type=int, default=100, help="samples scored by each --eval")
    p.add_argument("--sample_batch", type=int, default=100, help="sampling batch")
    p.add_argument("--loss_images", type=int, default=500, help="test images in the per-level DSM loss")
    p.add_argument("--n_steps_each", type=int, default=None, help="Langevin steps per level (default: the config's)")
    p.add_argument("--snapshots", action="store_true", help="also score every numbered snapshot of each run")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.ema=true fast.bf16=false")
    p.add_argument("--eval_variant", action="append", default=None,
                   help="NAME:KEY=VALUE,...: one --eval with these sampling overrides (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help="one training run per seed")
    p.add_argument("--n_reference", type=int, default=10000, help="images in each reference row")
    p.add_argument("--out", default="run/bench", help="where the runs go")
    p.add_argument("--device", default="cpu", type=main.parse_device, metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N or mps for training and --eval; default cpu (the rows of "
                        "docs/results.md are CPU rows)")
    args = p.parse_args(argv)
    try:
        devices.resolve_device(args.device)  # a device that is not there: one line, before any run folder
    except NCSNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
        def flags(doc, level="warning", root=root, seed=seed):
            return ["--device", args.device, "--run", root, "--doc", doc, "--seed", str(seed), "--verbose", level]

        t = time.time()  # info level: stdout.txt then records when each snapshot was written
        if main.main(["--config", cfg_path, *flags("q", "info")]) != 0:
            return 1
        train_s = time.time() - t
        log_dir = os.path.join(root, "logs", "q")
        loss = read_scalars(os.path.join(root, "tensorboard", "q"))["train_loss/raw"]
        saved = snapshot_times(log_dir, train_s)
        steps = sorted(saved) if args.snapshots else [max(saved)]
        for step in steps:
            final_loss = mean_loss_before(loss, step)
            for name, sets in variants:
                r, eval_s = score(log_dir, step, sets, flags)
                if r is None:
                    return 1
                rows.append((name, seed, step, r, saved[step], final_loss, eval_s))
    print(f"\n{os.path.relpath(args.config, REPO)}: ngf {cfg['model']['ngf']}, batch {cfg['training']['batch_size']}; "
          f"{args.n_samples} samples; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | seed | step | FID | IS | confidence | digit shares | white | train loss | train s | "
          "sampling s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, seed, step, r, train_s, final_loss, eval_s in rows:
        shares = r["class_shares"]
        print(f"| {name} | {seed} | {step} | {r['fid']:.1f} | {r['inception_score']:.2f} | "
              f"{r['mean_confidence']:.3f} | {min(shares):.0%}-{max(shares):.0%} | {r.get('white_share', 0):.0%} | "
              f"{final_loss:.2f} | {train_s:.0f} | {r['sampling_seconds']:.0f} | {eval_s:.0f} |")
    return 0


def snapshot_times(log_dir, train_s):
    """{step: seconds of training until that snapshot was written}, from stdout.txt's time stamps."""
    import re
    from datetime import datetime

    stamps, start = {}, None
    with open(os.path.join(log_dir, "stdout.txt")) as f:
        for line in f:
            m = re.match(r"\w+ (\S+ \S+) - (.*)", line)
            if not m:
                continue
            when = datetime.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")
            if start is None and m.group(2).startswith("training at step"):
                start = when
            s = re.match(r"step (\d+): saved checkpoint_", m.group(2))
            if s and start is not None:
                stamps[int(s.group(1))] = (when - start).total_seconds()
    last = max(step for step, _ in numbered_snapshots(log_dir))
    stamps[last] = train_s  # the whole training command, start-up included
    return {step: stamps.get(step, float("nan")) for step, _ in numbered_snapshots(log_dir)}


def mean_loss_before(loss, step, n=20):
    steps = [s for s in sorted(loss) if s <= step][-n:]
    return sum(loss[s] for s in steps) / max(1, len(steps))


def score(log_dir, step, sets, flags):
    """--eval of the run's snapshot at `step` (--ckpt STEP) with the variant's sampling overrides (--set)."""
    extra = [w for item in split_sets([sets]) for w in ("--set", item)]
    t = time.time()
    if main.main([*flags("q"), "--eval", "--ckpt", str(step), *extra]) != 0:
        return None, 0
    with open(os.path.join(log_dir, "metrics.json")) as f:
        return json.load(f)[-1], time.time() - t


if __name__ == "__main__":
    sys.exit(main_bench())
