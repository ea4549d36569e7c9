"""What checking a checkpoint costs: torch.load alone against checkpoint.load_checkpoint (every zip member's CRC-32
checked by checkpoint.damage, then the same torch.load), on a checkpoint of the paper's size (config.yml: ngf 64,
with its Adam state), median of --repeats runs each, interleaved, from the page cache (a warm-up read first).

    .venv/bin/python bench/ckpt_verify.py [--repeats 9] [--config config.yml]

Prints the checkpoint's size and one line per measurement; docs/checkpoints.md quotes them.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import build  # noqa: E402
import checkpoint  # noqa: E402
import runner  # noqa: E402
from common import atomic_torch_save  # noqa: E402
from schema import load_config  # noqa: E402


def make_file(config_path, folder):
    """checkpoint.pth of an ngf-64 run after one Adam step (moments filled), as training writes it."""
    cfg = load_config(config_path)
    torch.manual_seed(0)
    model = build.make_model(cfg, torch.device("cpu"))
    ema = runner.make_ema(model) if cfg.model.ema else None
    optimizer = build.make_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = os.path.join(folder, "checkpoint.pth")
    atomic_torch_save(checkpoint.make_checkpoint(cfg, model, ema, optimizer, torch.Generator(), 1, 1234), path)
    return path, cfg, sum(p.numel() for p in model.parameters())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "config.yml"))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path, cfg, n_params = make_file(args.config, folder)
        size = os.path.getsize(path)
        print(f"checkpoint: ngf {cfg.model.ngf}, {n_params:,} parameters, EMA {'on' if cfg.model.ema else 'off'}, "
              f"{size:,} bytes ({size / 2 ** 20:.1f} MiB); torch {torch.__version__}; {args.repeats} runs each")
        ways = {"torch.load alone": lambda: torch.load(path, map_location="cpu", weights_only=True),
                "CRC-32 check alone (checkpoint.damage)": lambda: checkpoint.damage(path),
                "check + torch.load (checkpoint.load_checkpoint)": lambda: checkpoint.load_checkpoint(path)}
        assert checkpoint.damage(path) is None
        times = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:<48} median {1000 * med:7.1f} ms  (min {1000 * min(ts):7.1f}, max {1000 * max(ts):7.1f})"
                  f"  {size / med / 2 ** 20:7.0f} MiB/s")
        extra = statistics.median(times["check + torch.load (checkpoint.load_checkpoint)"]) / \
            statistics.median(times["torch.load alone"])
        print(f"load_checkpoint / torch.load: {extra:.2f}x")


if __name__ == "__main__":
    main()
