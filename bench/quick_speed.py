"""The quick recipe's network (configs/quick.yml: ngf 8, batch 64, fp32) on the speed paths of `fast:`, side by side.

    .venv/bin/python bench/quick_speed.py                                   # all variants, 1 thread
    .venv/bin/python bench/quick_speed.py --threads 2 --variants default norms_cl network_cl

For every variant: training steps per second (the repository's DSM loss with scale_by_sigma, backward, fused Adam)
and network evaluations per second at the sampling batch (forward under inference_mode, as the sampler runs it),
medians of --repeats timed repetitions taken in one process, variants alternating so that load from other
processes hits them alike. For the compiled variants, the compile time: the first training step plus the first
sampling evaluation (each compiles its own graphs) in a new process with an empty TORCHINDUCTOR_CACHE_DIR (cold),
then again in another new process with the same directory (warm). The budget columns are the steps each path fits
into --budget seconds (default 15 minutes less 90 s of sampling), its compile time counted, and their ratio to the
default path's. Two tables: wall clock, and CPU time (this process and its compiler children), which with --threads 1
is close to what the wall clock would be on an idle machine when other processes share the cores; with more threads
only the wall clock means anything. --cache DIR reuses the warm cache of an earlier run and skips the compile
columns (e.g. to compare environment settings). Results and their reading: docs/speed.md. Variants:

    default             eager, NCHW, fast_kernels, fused Adam (fast.compile_norms and fast.channels_last off)
    cl                  the same in channels_last (fast.channels_last)
    norms               CIN++ and its ELU under torch.compile, convolutions eager (fast.compile_norms)
    norms_cl            the same in channels_last: the `fast:` section of configs/quick.yml
    norms_cl_simd256    the same with inductor's vectors 256 bits wide (AVX2: 8 floats, the 8 channels of ngf 8)
    network             the whole network under torch.compile (fast.compile)
    network_cl          the same in channels_last
    network_cl_simd256  the same with 256-bit vectors
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import CondRefineNetDilated  # noqa: E402
from noise import get_sigmas  # noqa: E402
from runner import dsm_loss  # noqa: E402

VARIANTS = {  # name: (channels_last, compile scope, inductor's SIMD width in bits; None: its own choice)
    "default": (False, None, None), "cl": (True, None, None),
    "norms": (False, "norms", None), "norms_cl": (True, "norms", None), "norms_cl_simd256": (True, "norms", 256),
    "network": (False, "network", None), "network_cl": (True, "network", None),
    "network_cl_simd256": (True, "network", 256)}


class Variant:
    def __init__(self, name, ngf, batch, sample_batch):
        channels_last, scope, simdlen = VARIANTS[name]
        torch.manual_seed(0)
        self.name, self.scope = name, scope
        self.mf = torch.channels_last if channels_last else torch.contiguous_format
        self.model = CondRefineNetDilated(ngf=ngf, num_classes=10, fast_kernels=True).to(memory_format=self.mf)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True)
        options = {"options": {"cpp.simdlen": simdlen}} if simdlen else {}
        if scope == "network":
            self.model.compile(dynamic=False, **options)
        elif scope == "norms":
            self.model.compile_norms(dynamic=False, **options)
        self.sigmas = get_sigmas(1.0, 0.01, 10)
        self.gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 1, 28, 28)
        self.xs = torch.rand(sample_batch, 1, 28, 28)
        self.ys = torch.full((sample_batch,), 3, dtype=torch.long)

    def score(self, x, y):  # build.make_score_fn with model.scale_by_sigma
        return self.model(x.contiguous(memory_format=self.mf), y) / self.sigmas[y].view(-1, 1, 1, 1)

    def train_step(self):
        loss, _ = dsm_loss(self.score, self.x, self.sigmas, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        self.opt.step()

    def sample_step(self):
        with torch.inference_mode():
            self.score(self.xs, self.ys)


def timed(fn):
    """Wall-clock seconds of fn()."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_timed(fn):
    """(wall seconds, CPU seconds of this process and the children it waited for) of fn(). With one thread, the
    CPU seconds are what the wall time would be on an idle machine, less the cost of sharing caches."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def cpu_seconds():
    """CPU seconds of this process (nanosecond clock) and of the children it waited for (compilers; 10 ms ticks)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def compile_times(args, name, cache):
    """(first training step, first sampling evaluation) in seconds, in a new process compiling into `cache`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--compile_time_of", name, "--threads", str(args.threads),
           "--ngf", str(args.ngf), "--batch", str(args.batch), "--sample_batch", str(args.sample_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ngf", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample_batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions of each variant (medians)")
    p.add_argument("--budget", type=float, default=810, help="seconds of training (15 min less 90 s of sampling)")
    p.add_argument("--cache", help="an inductor cache directory of an earlier run (its <variant> folders): measure "
                   "the steps only, without the cold and warm compile times")
    p.add_argument("--compile_time_of", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one child
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile_time_of:
        v = Variant(args.compile_time_of, args.ngf, args.batch, args.sample_batch)
        (train, train_cpu), (sample, sample_cpu) = cpu_timed(v.train_step), cpu_timed(v.sample_step)
        print(json.dumps({"train": train, "sample": sample, "train_cpu": train_cpu, "sample_cpu": sample_cpu}))
        return
    if "default" not in args.variants:
        args.variants.insert(0, "default")
    print(f"torch {torch.__version__}, {args.threads} thread(s), ngf {args.ngf}, batch {args.batch}, sampling batch "
          f"{args.sample_batch}, medians of {args.repeats}; load average at the start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    compiled = {}
    cache = args.cache or tempfile.mkdtemp(prefix="quick_speed_inductor_")
    print(f"inductor cache: {cache}")
    for name in args.variants:
        if VARIANTS[name][1] is not None and not args.cache:
            own = os.path.join(cache, name)  # empty: the cold compile; then the same again: the warm one
            compiled[name] = {"cold": compile_times(args, name, own), "warm": compile_times(args, name, own)}
            print(f"{name}: compile cold {compiled[name]['cold']}, warm {compiled[name]['warm']}", flush=True)
    variants = []
    for name in args.variants:
        if VARIANTS[name][1] is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, name)
        v = Variant(name, args.ngf, args.batch, args.sample_batch)
        for _ in range(2):  # compile (from the warm cache), oneDNN's first-call set-up
            v.train_step()
            v.sample_step()
        variants.append(v)
    times = {v.name: {"train": [], "sample": [], "train_cpu": [], "sample_cpu": []} for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            for part, fn in (("train", v.train_step), ("sample", v.sample_step)):
                wall, cpu = cpu_timed(fn)
                times[v.name][part].append(wall)
                times[v.name][f"{part}_cpu"].append(cpu)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    med = {n: {k: statistics.median(t[k]) for k in t} for n, t in times.items()}
    for clock, suffix in (("wall clock", ""), ("CPU time (what the wall time would be on an idle machine)", "_cpu")):
        print(f"\n{clock}:")
        table(args, med, compiled, suffix)


def table(args, med, compiled, suffix):
    train, sample = f"train{suffix}", f"sample{suffix}"
    base = med["default"]
    base_steps = args.budget / base[train]
    print(f"| variant | train s/step | steps/s | x default | sampling s/eval | x default | compile cold s (train + "
          f"sample) | warm s | steps in {args.budget:.0f} s, cold | x default | warm | x default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        m, c = med[name], compiled.get(name)
        cold = c["cold"][train] + c["cold"][sample] if c else 0.0
        warm = c["warm"][train] + c["warm"][sample] if c else 0.0
        steps_cold = max(0.0, args.budget - cold) / m[train]
        steps_warm = max(0.0, args.budget - warm) / m[train]
        print(f"| {name} | {m[train]:.3f} | {1 / m[train]:.2f} | {base[train] / m[train]:.2f} | {m[sample]:.3f} | "
              f"{base[sample] / m[sample]:.2f} | "
              + (f"{cold:.0f} ({c['cold'][train]:.0f} + {c['cold'][sample]:.0f}) | "
                 f"{warm:.0f} ({c['warm'][train]:.0f} + {c['warm'][sample]:.0f})" if c else "- | -")
              + f" | {steps_cold:.0f} | {steps_cold / base_steps:.2f} | {steps_warm:.0f} | "
              f"{steps_warm / base_steps:.2f} |")
    print(f"(sampling as configs/quick.yml runs it, 301 evaluations of {args.sample_batch} samples: "
          + ", ".join(f"{n} {301 * med[n][sample]:.0f} s" for n in args.variants) + ")")


if __name__ == "__main__":
    main()
