"""Training and sampling speed of the plain path against the fast path, measured side by side in one run.

    .venv/bin/python bench/speed.py                       # ngf 64 and ngf 16, batch 128, on the CPU (and CUDA)
    .venv/bin/python bench/speed.py --ngf 32 --repeats 5 --profile
    .venv/bin/python bench/speed.py --devices cuda --compile      # CUDA rows only, with a torch.compile row

plain: fp32, eager, contiguous layout, the straightforward kernels (F.elu, torch.var_mean for the CIN++
       statistics, F.avg_pool2d for the 5x5 pooling), Adam with its default (foreach) kernels.
fast:  what `fast:` in config.yml turns on: bf16 autocast with fp32 master weights (network input and
       output kept in fp32), model.py's fast kernels (vectorised ELU, CIN++ statistics from E[x] and E[x^2],
       the pooling as a depthwise convolution), fused Adam (and channels_last if asked); on CUDA also TF32
       and cudnn.benchmark (fast.tf32, fast.cudnn_benchmark). The plain path on CUDA is true fp32 (TF32 off).
auto:  the path config.yml runs on this machine for this network and batch: fast.auto's choice among fp32
       and bf16 (bf16 for sampling only), NCHW and channels_last (speedpath.py; read from its cache, or timed
       now and cached), for training and for sampling each, with fast kernels and fused Adam. Its percent of
       peak is of the chosen dtype's.
compile: (with --compile) the fast path with the network under torch.compile; its compilation is in the
       warm-up, not in the timings.
Each variant runs `--repeats` timed repetitions after a warm-up, alternating plain and fast so that load
from other processes hits both alike; the table gives medians. A training step is the repository's own DSM
loss, backward and Adam step; a sampling step is one network evaluation of annealed Langevin dynamics
(forward under inference_mode) at the sampling batch size. "peak" is the share of the machine's matmul
peak in the same dtype, measured in the same run with a large matrix multiply.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import build  # noqa: E402
import schema  # noqa: E402
import speedpath  # noqa: E402
from model import CondRefineNetDilated  # noqa: E402
from noise import get_sigmas  # noqa: E402
from runner import dsm_loss  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, reps=20):
    """The machine's peak in this dtype: the best of `reps` large matrix multiplies, after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)  # FLOP/s


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
            f.write("5")


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024


def memory_text(mem):
    """The memory cell of a row: 'peak GiB (the step's own GiB)', or 'not measured' (only plain and fast are)."""
    if mem is None:
        return "not measured"
    peak, before = mem
    return f"{peak / 2 ** 30:.2f} GiB ({(peak - before) / 2 ** 30:.2f} GiB)"


def peak_memory_in_fresh_process(name, ngf, device, batch, channels_last):
    """Peak memory of two training steps of one variant, alone in a new process (on the CPU the peak resident
    set, which includes torch's own ~0.5 GiB; on CUDA the peak allocated memory)."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_of", name, "--ngf", str(ngf), "--batch", str(batch),
           "--device", str(device)] + (["--channels_last"] if channels_last else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    peak, before = map(int, out.strip().splitlines()[-1].split())
    return peak, before


def memory_of(name, ngf, device, batch, channels_last):
    v = Variant(name, ngf, device, batch, fast=name == "fast", channels_last=channels_last)
    v.sample_step()
    reset_peak_memory(device)
    before = peak_memory(device)  # the process before the step: torch, the model, the optimiser, the data
    v.train_step()
    v.train_step()
    return peak_memory(device), before


class Variant:
    """One configuration of model + optimiser + precision, with a timed training and sampling step."""

    def __init__(self, name, ngf, device, batch, fast, channels_last=False, compile=False, bf16=None):
        torch.manual_seed(0)
        self.name, self.device, self.batch, self.fast = name, device, batch, fast
        self.bf16 = fast if bf16 is None else bf16  # the fast path is bf16; auto's may be fp32
        self.model = CondRefineNetDilated(ngf=ngf, num_classes=10, fast_kernels=fast).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True if fast else None)
        if compile:
            self.model = torch.compile(self.model)
        self.sigmas = get_sigmas(1.0, 0.01, 10).to(device)
        self.gen = torch.Generator(device).manual_seed(0)
        self.x = torch.rand(batch, 1, 28, 28, device=device).contiguous(memory_format=self.memory_format)
        self.labels = torch.randint(10, (batch,), device=device)

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self):
        with self.autocast():
            loss, _ = dsm_loss(self.model, self.x, self.sigmas, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        self.opt.step()

    def sample_step(self):
        with torch.inference_mode(), self.autocast():
            self.model(self.x, self.labels)

    def precision(self):
        """The plain path is true fp32; the fast path uses TF32 and cudnn.benchmark (they matter on CUDA only)."""
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.fast
        torch.backends.cudnn.benchmark = self.fast

    def time(self, fn, reps=1):
        self.precision()
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(self.device)
        return (time.perf_counter() - t0) / reps

    def flops(self, fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()


def auto_paths(ngf, device, batch):
    """{"train": name, "sample": name}: the speed paths config.yml (fast.auto) runs for this network and batch."""
    config = schema.load_config(os.path.join(REPO, "config.yml"), [f"model.ngf={ngf}", "model.num_classes=10"])
    sigmas = get_sigmas(config.model.sigma_begin, config.model.sigma_end, config.model.num_classes).to(device)
    paths = {}
    for kind, step_of in (("train", build.timed_training_step(device, batch, sigmas, dsm_loss)),
                          ("sample", build.timed_sampling_step(device, batch, sigmas))):
        _, paths[kind], why = speedpath.choose(config, device, kind, batch, step_of)
        print(f"auto, ngf {ngf}, {kind}: {paths[kind]}, {why}")
    return paths


def auto_variant(ngf, device, batch, name):
    bf16, channels_last = speedpath.PATHS[name]
    return Variant(f"auto ({name})", ngf, device, batch, fast=True, channels_last=channels_last, bf16=bf16)


def bench(ngf, device, batch, repeats, channels_last, compile=False, names=("plain", "fast", "auto")):
    auto = auto_paths(ngf, device, batch)
    variants = [Variant("plain", ngf, device, batch, fast=False)]  # always: the ratios are against it
    if "fast" in names:
        variants.append(Variant("fast", ngf, device, batch, fast=True, channels_last=channels_last))
    variants.append(auto_variant(ngf, device, batch, auto["train"]))
    auto_sample = auto_variant(ngf, device, batch, auto["sample"]) if auto["sample"] != auto["train"] else None
    if compile:
        variants.append(Variant("compile", ngf, device, batch, fast=True, channels_last=channels_last, compile=True))
    steps = 1 if device.type == "cpu" else 10
    results = {v.name: {"train": [], "sample": []} for v in variants}
    for v in variants + [auto_sample] * bool(auto_sample):  # warm-up (kernel choice, compilation) untimed
        v.precision()
        v.train_step()
        v.sample_step()
    for _ in range(repeats):
        for v in variants:  # alternate, so that a noisy neighbour slows both alike
            results[v.name]["train"].append(v.time(v.train_step, steps))
            results[v.name]["sample"].append(v.time((auto_sample if auto_sample and v.name.startswith("auto")
                                                     else v).sample_step, steps))
    rows = []
    for v in variants:
        mem = peak_memory_in_fresh_process(v.name, ngf, device, batch, channels_last) if v.name in ("plain", "fast") \
            else None
        train_s = statistics.median(results[v.name]["train"])
        sample_s = statistics.median(results[v.name]["sample"])
        train_flops, sample_flops = (v.flops(v.train_step), v.flops(v.sample_step)) if v.name != "compile" else \
            (rows[-1]["train_flops"], rows[-1]["sample_flops"])  # the same arithmetic as the auto path's
        sampler = auto_sample if auto_sample and v.name.startswith("auto") else v  # the variant timed sampling
        if sampler is not v:
            v.name = f"auto ({auto['train']} training, {auto['sample']} sampling)"
        rows.append(dict(variant=v.name, bf16=(v.bf16, sampler.bf16), train_ips=batch / train_s,
                         sample_ips=batch / sample_s, train_s=train_s,
                         train_gflops=train_flops / train_s / 1e9, sample_gflops=sample_flops / sample_s / 1e9,
                         mem=mem, train_flops=train_flops, sample_flops=sample_flops))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ngf", type=int, nargs="+", default=[64, 16])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant (medians)")
    p.add_argument("--channels_last", action="store_true", help="fast path in channels_last layout")
    p.add_argument("--profile", action="store_true", help="print the top ops of one plain and one fast step")
    p.add_argument("--memory_of", choices=["plain", "fast"], help=argparse.SUPPRESS)  # internal: one variant
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                   help="which devices get rows (default: the CPU, and CUDA when present)")
    p.add_argument("--compile", action="store_true", help="add a row for the fast path under torch.compile")
    p.add_argument("--matmul_n", type=int, default=2048, help="size of the matrix multiply that measures the peak")
    p.add_argument("--variants", nargs="+", choices=["plain", "fast", "auto"], default=["plain", "fast", "auto"],
                   help="rows to time (plain always): leave fast out where bf16 is not native (it takes hours)")
    args = p.parse_args()
    if args.memory_of:
        print(*memory_of(args.memory_of, args.ngf[0], torch.device(args.device), args.batch, args.channels_last))
        return
    devices = [torch.device(d) for d in args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"medians of {args.repeats}")
    for device in devices:
        peak32 = matmul_peak(device, torch.float32, n=args.matmul_n)
        # without native bf16 a 2048 x 2048 bf16 product takes tens of seconds: a smaller one tells as much
        native = speedpath.native_bf16(device)
        peak16 = matmul_peak(device, torch.bfloat16, n=args.matmul_n if native else 256, reps=20 if native else 3)
        print(f"\n{device}: matmul peak fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
        print("| ngf | path | train img/s | sample img/s | train GFLOP/s (% of peak) | sample GFLOP/s (% of peak) "
              "| peak memory of a process training (of it the step's own) |")
        print("|---|---|---|---|---|---|---|")
        for ngf in args.ngf:
            rows = bench(ngf, device, args.batch, args.repeats, args.channels_last, args.compile, args.variants)
            for r in rows:
                peak_t, peak_s = (peak16 if bf16 else peak32 for bf16 in r["bf16"])
                print(f"| {ngf} | {r['variant']} | {r['train_ips']:.1f} | {r['sample_ips']:.1f} | "
                      f"{r['train_gflops']:.0f} ({100 * r['train_gflops'] * 1e9 / peak_t:.0f}%) | "
                      f"{r['sample_gflops']:.0f} ({100 * r['sample_gflops'] * 1e9 / peak_s:.0f}%) | "
                      f"{memory_text(r['mem'])} |")
            plain = rows[0]
            for r in rows[1:]:
                print(f"| {ngf} | {r['variant']} / plain | {r['train_ips'] / plain['train_ips']:.2f}x | "
                      f"{r['sample_ips'] / plain['sample_ips']:.2f}x | | | |")
            if args.profile:
                for fast_path in (False, True):
                    v = Variant("p", ngf, device, args.batch, fast=fast_path, channels_last=args.channels_last)
                    v.train_step()
                    with torch.profiler.profile() as prof:
                        v.train_step()
                    print(f"\nprofile of one {'fast' if fast_path else 'plain'} training step, ngf {ngf}:")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
