"""fast.auto: the fastest speed path of this machine for the run's own network and batch, chosen by timing, as
cudnn.benchmark chooses convolution kernels on a GPU.

A speed path is a precision and a layout: fp32 or bf16 autocast (fp32 master weights, the network's input and
output convolutions kept fp32), NCHW or channels_last (NHWC). Which one is fastest depends on the CPU: bf16 wins
where the CPU has AMX or AVX512-BF16 and loses several times over where it has neither, and channels_last wins or
loses by the network's size (docs/speed.md). With fast.auto on, a command times a few steps of every candidate
and runs the fastest. bf16 is a candidate for sampling only: in training it made config.yml's loss spike where
fp32 did not (BF16_TRAINING); a config that pins fast.bf16 still trains in it. The choice is cached per machine,
torch version, network and batch (cache_path()), so it is measured once. fast.auto off pins the path that
fast.bf16 and fast.channels_last name.

No choice is made (the config's own path runs, and the log says why): under --deterministic, where two runs
could time differently and so compute differently; with several ranks, which must run one path; and on a resume
whose checkpoint was last trained on this machine, which keeps that path (a candidate of its own) so that the
resumed run is the same as an unbroken one. The checkpoint records which path trained which steps (`speed_paths`).
"""
import dataclasses
import json
import logging
import os
import platform
import statistics
import time

import torch

import devices
from common import NCSNError, atomic_write_bytes

log = logging.getLogger("ncsn")

# name -> (fast.bf16, fast.channels_last)
PATHS = {"fp32": (False, False), "fp32_channels_last": (False, True), "bf16": (True, False),
         "bf16_channels_last": (True, True)}
WARM_UP_STEPS = 1  # untimed steps of each candidate first (kernels built, caches filled)
TIMED_STEPS = 2  # timed steps of each candidate; the choice goes by their median
CACHE_FORMAT = 1


def path_of(config):
    """The name of the speed path that `config`'s fast.bf16 and fast.channels_last pin."""
    pinned = (config.fast.bf16, config.fast.channels_last)
    return next(name for name, switches in PATHS.items() if switches == pinned)


def with_path(config, name):
    """`config` with the switches of the speed path `name` (a new config; the old one is unchanged)."""
    bf16, channels_last = PATHS[name]
    return dataclasses.replace(config, fast=dataclasses.replace(config.fast, bf16=bf16, channels_last=channels_last))


def native_bf16(device):
    """Whether bf16 runs natively here: on a CPU only with AVX512-BF16 or AMX (oneDNN's check); elsewhere where
    autocast has it."""
    return bool(devices.cpu_native_bf16()) if device.type == "cpu" else devices.bf16_autocast_ok(device)


BF16_TRAINING = ("bf16 autocast is not chosen for training: it made config.yml's training spike where fp32 did "
                 "not (docs/results.md#bf16-and-the-papers-network); pin fast.bf16 with fast.auto off to train in it")


def candidates(device, kind):
    """The paths worth timing for `kind` ("train" or "sample") on `device`: the fp32 ones, and for sampling the bf16
    ones too where bf16 is native (elsewhere it falls back to reference kernels several times slower than fp32, and
    timing it would cost minutes). Training is not put on bf16 by a timing (BF16_TRAINING)."""
    return [name for name, (bf16, _) in PATHS.items() if not bf16 or (kind == "sample" and native_bf16(device))]


def machine_key(device):
    """What a choice depends on besides the network: the processor, the kernels torch and oneDNN may use on it, the
    threads, torch's version."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = cpu_name()
        where += f", {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        where += f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""
    return f"{device.type}: {where}; torch {torch.__version__}"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choice_key(config, device, kind, batch):
    """The cache entry of one choice: the machine, the network, the batch and what is timed ("train" or "sample")."""
    fast = config.fast
    compiled = "compile" if fast.compile else "compile_norms" if fast.compile_norms else "eager"
    return (f"{machine_key(device)} | ngf {config.model.ngf}, {config.model.num_classes} classes, batch {batch}, "
            f"{kind}, {compiled}, fast_kernels {fast.fast_kernels}")


def cache_path():
    """The file of cached choices: $NCSN_SPEED_CACHE, else ncsn-mnist/speed_paths.json in the user's cache folder."""
    if os.environ.get("NCSN_SPEED_CACHE"):
        return os.environ["NCSN_SPEED_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ncsn-mnist", "speed_paths.json")


def read_cache(path):
    """The cached choices {key: {"path": name, "seconds": {name: s}}}; {} for a missing file, and for a damaged one
    with a warning (it is only a cache: the choice is timed again and the file rewritten)."""
    try:
        with open(path) as f:
            cache = json.load(f)
        if cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("choices"), dict):
            raise ValueError("not a speed path cache of this code")
        return cache["choices"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("speed path cache %s cannot be read (%s): timing the paths again and rewriting it", path,
                    str(e).splitlines()[0][:120])
        return {}


def write_cache(path, choices):
    """Write the cached choices {key: entry} to `path` atomically; a warning, not an error, where it cannot."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_bytes(path, json.dumps({"format": CACHE_FORMAT, "choices": choices}, indent=1).encode())
    except (OSError, NCSNError) as e:  # NCSNError: atomic_write's full disk
        log.warning("speed path cache %s not written (%s): the next command times the paths again", path, e)


def fastest(names, step_of, clock=time.perf_counter, sync=lambda: None):
    """(name, {name: median seconds a step}) of the fastest of `names`. step_of(name) builds a candidate and
    returns its step, a function of no arguments; each runs WARM_UP_STEPS untimed steps, then TIMED_STEPS timed
    ones by `clock`, candidates taking turns so that load from other processes falls on all alike."""
    steps = {name: step_of(name) for name in names}
    for _ in range(WARM_UP_STEPS):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for _ in range(TIMED_STEPS):
        for name in names:
            t0 = clock()
            steps[name]()
            sync()
            times[name].append(clock() - t0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return min(names, key=seconds.__getitem__), seconds


def choose(config, device, kind, batch, step_builder, deterministic=False, world=1, keep=None,
           clock=time.perf_counter):
    """(config on the chosen path, the path's name, how it was chosen in words) for a command that runs `kind`
    ("train" or "sample") at `batch` images. step_builder(config) -> a function of no arguments that runs one step
    of the network of `config` (built for that candidate alone; the run's own state is not touched). `keep`: the
    path of the checkpoint a resume starts from, when it was trained on this machine."""
    if not config.fast.auto:
        return config, path_of(config), "pinned by fast.bf16 and fast.channels_last (fast.auto is off)"
    if deterministic:
        return config, path_of(config), "the config's own, as --deterministic asks (a timed choice could differ " \
                                        "between two runs)"
    if world > 1:
        return config, path_of(config), "the config's own, as every rank must run one path"
    names = candidates(device, kind)
    if keep in names:
        return with_path(config, keep), keep, "the path this run was trained on here until its checkpoint"
    key, path = choice_key(config, device, kind, batch), cache_path()
    choices = read_cache(path)
    cached = choices.get(key)
    if isinstance(cached, dict) and cached.get("path") in names:
        why = f"cached in {path} ({timings(cached.get('seconds') or {})})"
        return with_path(config, cached["path"]), cached["path"], why
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    log.info("fast.auto: timing %d speed paths for %s at batch %d (%d + %d steps each): %s", len(names), kind, batch,
             WARM_UP_STEPS, TIMED_STEPS, ", ".join(names))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNGs untouched
        best, seconds = fastest(names, lambda name: step_builder(with_path(config, name)), clock, sync)
    write_cache(path, {**choices, key: {"path": best, "seconds": seconds}})
    dropped = [n for n in PATHS if n not in names]
    reason = BF16_TRAINING if kind == "train" else "no native bf16 on this CPU"
    why = f"timed here ({timings(seconds)})" + (f"; not timed: {', '.join(dropped)} ({reason})" if dropped else "")
    if keep in PATHS and keep not in names:
        why += f"; the checkpoint's last steps ran {keep}, which this choice leaves"
    return with_path(config, best), best, why


def record(name, first, history, last, device):
    """The checkpoint's `speed_paths`: `history` and the range first..last trained on the path `name` here."""
    return list(history) + [{"first": first, "last": last, "path": name, "machine": machine_key(device)}]


def kept_path(ckpt, device):
    """The path of the last step range of `ckpt` when that range was trained on this machine, else None."""
    history = (ckpt.get("speed_paths") or []) if ckpt else []
    return history[-1]["path"] if history and history[-1].get("machine") == machine_key(device) else None


def timings(seconds):
    """"bf16 5.34 s, fp32 9.47 s": the timings a choice was made from, fastest first."""
    return ", ".join(f"{name} {s:.3g} s" for name, s in sorted(seconds.items(), key=lambda kv: float(kv[1])))


def log_choice(kind, name, why):
    log.info("speed path for %s: %s, %s", kind, name, why)
