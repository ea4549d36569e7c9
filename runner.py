"""Data, denoising score matching, checkpoints and annealed Langevin dynamics for NCSN on MNIST.

The two pure functions of the method come first: `dsm_loss` (eq. 5 and 6 of Song & Ermon, 2019) and
`anneal_langevin_dynamics` (their Algorithm 1). `Runner` wires them to MNIST, the optimiser, TensorBoard
and checkpoints. A checkpoint is one dict with named keys and holds only tensors and plain values, so it
loads with torch.load(weights_only=True).
"""
import copy
import dataclasses
import json
import logging
import math
import os
import signal
import struct
import time

import numpy as np
import torch
import yaml

from model import CondRefineNetDilated
from schema import ConfigError, config_from_dict, config_to_dict

log = logging.getLogger("ncsn")

CHECKPOINT_FORMAT = 1
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]
# Keys a resumed run may change; any other difference to the checkpoint's config is an error.
RESUMABLE_CHANGES = {"training.n_epochs", "training.n_iters", "training.snapshot_freq", "training.test_freq",
                     "training.log_freq", "training.keep_snapshots", "data.root", "sampling.n_steps_each",
                     "sampling.step_lr", "sampling.n_samples", "sampling.batch_size", "sampling.n_frames",
                     "fast.bf16", "fast.fast_kernels", "fast.fused_adam", "fast.channels_last", "eval.n_samples",
                     "eval.n_samples_cpu", "eval.every_snapshots", "eval.n_training", "eval.loss_images",
                     "eval.loss_images_cpu"}


class NCSNError(RuntimeError):
    """An error the user can act on; main.py prints its one-line message and exits 1."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; main.py exits 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------
# The method

def get_sigmas(sigma_begin, sigma_end, num_classes):
    """The noise levels {sigma_i}: a geometric sequence from sigma_1 = sigma_begin to sigma_L = sigma_end."""
    return torch.tensor(np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_classes)),
                        dtype=torch.float32)  # (L,)


def logit_transform(x, lam=1e-6):
    """Map [0, 1] to the real line: logit(lam + (1 - 2 lam) x)."""
    x = lam + (1 - 2 * lam) * x
    return torch.log(x) - torch.log1p(-x)


def data_space(config):
    """(to_model, to_image): pixels in [0, 1] to the space the model works in, and back."""
    if config.data.logit_transform:
        return logit_transform, torch.sigmoid
    return (lambda x: x), (lambda x: x)


def dsm_loss(score_fn, x, sigmas, generator=None, labels=None, anneal_power=2.0, z=None):
    """Denoising score matching loss per sample, eq. (5) and (6) of the paper.

    For each sample a level i ~ U{0..L-1} (unless `labels` is given) and z ~ N(0, I):
        x~ = x + sigma_i z,    l_i = 1/2 ||s(x~, i) + z / sigma_i||^2 * sigma_i ** anneal_power
    (the target -(x~ - x) / sigma_i^2 is -z / sigma_i). Returns (loss (B,), labels (B,)); the training
    objective is loss.mean(). Randomness comes only from `generator` (or the labels and z given).
    """
    if labels is None:
        labels = torch.randint(len(sigmas), (x.shape[0],), generator=generator, device=x.device)  # (B,)
    sigma = sigmas.to(x.device)[labels].view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    if z is None:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, 1, 28, 28)
    x_tilde = x + sigma * z
    score = score_fn(x_tilde, labels).float()  # (B, 1, 28, 28)
    loss = 0.5 * ((score + z / sigma) ** 2).flatten(1).sum(1) * sigma.flatten() ** anneal_power  # (B,)
    return loss, labels


def anneal_langevin_dynamics(score_fn, x, sigmas, n_steps_each, step_lr, generator=None, callback=None,
                             denoise=False, known=None, mask=None):
    """Annealed Langevin dynamics, Algorithm 1 of the paper.

    for i = 1..L:  alpha_i = step_lr * sigma_i^2 / sigma_L^2
        repeat n_steps_each times:  x <- x + alpha_i s(x, i) + sqrt(2 alpha_i) z,  z ~ N(0, I)
    score_fn(x, labels) -> score of the same shape; x is the start (e.g. U[0, 1] noise, (B, 1, 28, 28)).
    callback(i, t, x) is called after every step (level i, step t) for diagnostics. Returns the final x.
    Convention: the paper's Algorithm 1 writes x + (a/2) s + sqrt(a) z with a = epsilon sigma_i^2 / sigma_L^2,
    so this update is the paper's with epsilon = 2 step_lr. The authors' released code and configs use this
    form with step_lr = 2e-5, the number the paper quotes for epsilon; we keep the code's convention.

    denoise: after the last level, x <- x + sigma_L^2 s(x, L) (Tweedie's formula; NCSNv2, appendix C.2).
    Inpainting (appendix B.3 of the paper): with `known` (B, 1, 28, 28) and `mask` (1 where known), the known
    pixels are held at known + sigma_i z' (one z' per level) before and after every step, and set to `known`
    exactly at the end, so only the unknown pixels are generated.
    """
    sigmas = [float(s) for s in sigmas]
    inpaint = known is not None
    with torch.inference_mode():
        for i, sigma in enumerate(sigmas):
            labels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (B,)
            alpha = step_lr * (sigma / sigmas[-1]) ** 2
            if inpaint:
                noisy_known = known + sigma * torch.randn(x.shape, generator=generator, device=x.device)
                x = torch.where(mask, noisy_known, x)
            for t in range(n_steps_each):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + alpha * score_fn(x, labels).to(x.dtype) + math.sqrt(2 * alpha) * z
                if inpaint:
                    x = torch.where(mask, noisy_known, x)
                if callback is not None:
                    callback(i, t, x)
        if denoise:
            x = x + sigmas[-1] ** 2 * score_fn(x, labels).to(x.dtype)
        if inpaint:
            x = torch.where(mask, known, x)
    return x


def inpainting_mask(kind, shape, generator=None, device="cpu"):
    """Boolean mask (B, 1, H, W), True where a pixel is known. kind: bottom | right | square | random
    (hide the bottom half, the right half, a centred square of half the side, or each pixel with p = 0.75)."""
    B, C, H, W = shape
    known = torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "bottom":
        known[..., H // 2:, :] = False
    elif kind == "right":
        known[..., :, W // 2:] = False
    elif kind == "square":
        known[..., H // 4:H - H // 4, W // 4:W - W // 4] = False
    elif kind == "random":
        known = torch.rand(shape, generator=generator, device=device) >= 0.75
    else:
        raise NCSNError(f"unknown inpainting mask {kind!r}: bottom, right, square or random")
    return known


def max_pairwise_distance(x, chunk=4096):
    """The largest Euclidean distance between two rows of x (N, D): sigma_1 of NCSNv2's technique 1."""
    x = x.flatten(1).double()  # (N, D)
    sq = (x * x).sum(1)  # (N,)
    best, pair = -1.0, (0, 0)
    for i in range(0, len(x), chunk):
        d2 = sq[i:i + chunk, None] + sq[None, :] - 2 * x[i:i + chunk] @ x.T  # (chunk, N)
        v, j = d2.flatten().max(0)
        if v.item() > best:
            best, pair = v.item(), (i + int(j) // len(x), int(j) % len(x))
    return float((x[pair[0]] - x[pair[1]]).norm()), pair


def noise_ratio_gamma(dim):
    """gamma = sigma_{i-1} / sigma_i from NCSNv2's technique 2, for data of `dim` dimensions:
    Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 0.5."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    c = math.sqrt(2 * dim)
    return brentq(lambda g: norm.cdf(c * (g - 1) + 3 * g) - norm.cdf(c * (g - 1) - 3 * g) - 0.5, 1.0 + 1e-9, 10.0)


def num_noise_levels(sigma_begin, sigma_end, gamma):
    """Levels of a geometric sequence from sigma_begin down to sigma_end with ratio about gamma."""
    return 1 + math.ceil(math.log(sigma_begin / sigma_end) / math.log(gamma))


def langevin_step_lr(sigma_end, gamma, n_steps_each):
    """epsilon from NCSNv2's technique 4: the value that brings
    (1 - e/s^2)^(2T) (gamma^2 - 2e / (s^2 - s^2 (1 - e/s^2)^2)) + 2e / (s^2 - s^2 (1 - e/s^2)^2)
    closest to 1, with s = sigma_L and T = n_steps_each."""
    from scipy.optimize import minimize_scalar

    s2 = sigma_end ** 2

    def f(log_eps):
        e = math.exp(log_eps)
        r = 1 - e / s2
        c = 2 * e / (s2 - s2 * r ** 2)
        return abs(r ** (2 * n_steps_each) * (gamma ** 2 - c) + c - 1)

    res = minimize_scalar(f, bounds=(math.log(s2 * 1e-12), math.log(s2 * 0.999)), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x)


# ----------------------------------------------------------------------------------------------------------
# Data

def load_mnist(root, train, download=True):
    """MNIST images as one uint8 tensor (N, 28, 28), read by torchvision from <root>/MNIST/raw."""
    import torchvision  # slow to import; only the paths that read data need it

    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing and download:
        log.info("MNIST not found in %s: downloading it", raw)
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=bool(missing) and download)
    except (RuntimeError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(not os.path.isfile(os.path.join(raw, f)) for f in MNIST_FILES):
            raise NCSNError(f"MNIST is missing from {raw} and could not be downloaded ({why.rstrip(':')}); "
                            f"offline, put the four files {', '.join(MNIST_FILES)} there") from e
        raise NCSNError(f"an MNIST file in {raw} is truncated or corrupt ({why}); delete it to download it "
                        f"again, or copy it afresh") from e
    except (AssertionError, ValueError, IndexError, KeyError, EOFError) as e:
        raise NCSNError(f"an MNIST file in {raw} is truncated or corrupt ({type(e).__name__}); "
                        f"delete it to download it again, or copy it afresh") from e
    data = ds.data
    if data.dtype != torch.uint8 or data.dim() != 3 or tuple(data.shape[1:]) != (28, 28) or len(data) == 0:
        raise NCSNError(f"MNIST in {raw} has images of shape {tuple(data.shape)}, expected (N, 28, 28) uint8")
    return data  # (N, 28, 28) uint8


def dequantize(x_u8, generator=None, u=None):
    """Uniform dequantization: x = (255 x + u) / 256 with x in [0, 1], u ~ U[0, 1) (i.e. (k + u) / 256);
    u is drawn from `generator` unless given."""
    x = x_u8.unsqueeze(1).float()  # (B, 1, 28, 28)
    if u is None:
        u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x + u) / 256.0


def batch_noise(generator, batch, num_levels, device, shape=(1, 28, 28)):
    """The randomness of one training step, in the order a single process draws it: the dequantization
    noise u ~ U[0, 1) (B, 1, 28, 28), the levels i ~ U{0..L-1} (B,) and z ~ N(0, I) (B, 1, 28, 28)."""
    u = torch.rand((batch, *shape), generator=generator, device=device)
    labels = torch.randint(num_levels, (batch,), generator=generator, device=device)
    z = torch.randn((batch, *shape), generator=generator, device=device)
    return u, labels, z


def epoch_permutation(seed, epoch, n):
    """The order of the training set in `epoch`: a function of (seed, epoch) only, so resume needs no state."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(n, generator=g)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def atomic_torch_save(obj, path):
    """Write `obj` to `path` so that `path` is always either the old or the complete new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint dict with weights_only=True onto `device`; a one-line NCSNError if unreadable."""
    if not os.path.isfile(path):
        raise NCSNError(f"no checkpoint at {path}: train this run first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise NCSNError(f"checkpoint {path} is truncated or not a checkpoint of this code "
                        f"({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise NCSNError(f"checkpoint {path} is not a checkpoint of this code (no 'format': {CHECKPOINT_FORMAT})")
    return ckpt


def numbered_snapshots(log_dir):
    """[(step, file name)] of the checkpoint_<step>.pth files in log_dir, oldest first."""
    return sorted((int(f[11:-4]), f) for f in os.listdir(log_dir)
                  if f.startswith("checkpoint_") and f.endswith(".pth") and f[11:-4].isdigit())


def config_differences(old, new):
    """Dotted keys whose values differ between two config dicts."""
    return sorted(f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k])


def make_model(config, device):
    model = CondRefineNetDilated(ngf=config.model.ngf, num_classes=config.model.num_classes,
                                 channels=config.data.channels, logit_transform=config.data.logit_transform,
                                 fast_kernels=config.fast.fast_kernels).to(device)
    return model.to(memory_format=memory_format(config))


def memory_format(config):
    return torch.channels_last if config.fast.channels_last else torch.contiguous_format


def autocast(config, device):
    """bf16 autocast for the network when fast.bf16 is on (the weights stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.fast.bf16)


def make_score_fn(model, config, device, sigmas):
    """s(x, i) as the sampler and the loss call it: the model under the configured precision, divided by
    sigma_i when model.scale_by_sigma is on."""
    def score_fn(x, labels):  # x (B, 1, 28, 28), labels (B,)
        with autocast(config, device):
            out = model(x.contiguous(memory_format=memory_format(config)), labels)
        return out / sigmas[labels].view(-1, 1, 1, 1) if config.model.scale_by_sigma else out
    return score_fn


def make_ema(model):
    """A frozen copy of the model whose weights will track the exponential moving average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema, model, rate):
    """theta_ema <- rate * theta_ema + (1 - rate) * theta (NCSNv2, technique 5)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - rate)


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NCSNError(f"checkpoint {path} holds a different architecture: "
                        f"{str(e).splitlines()[0]}") from e


# ----------------------------------------------------------------------------------------------------------
# TensorBoard scalars

def read_scalars(tb_dir):
    """All scalars in the TensorBoard event files of `tb_dir`: {tag: {step: value}} (later files win)."""
    from tensorboardX.proto import event_pb2

    out = {}
    files = sorted(f for f in os.listdir(tb_dir) if "tfevents" in f) if os.path.isdir(tb_dir) else []
    for name in files:
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 16 + n > len(data):
                break  # a record cut off by a crash
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


# ----------------------------------------------------------------------------------------------------------

class NullWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Runner:
    """Training and sampling for one run: outputs in <run>/logs/<doc> and <run>/tensorboard/<doc>."""

    def __init__(self, args, config, device):
        self.args = args
        self.config = config  # schema.Config (read-only); None when --sample uses the run's own
        self.device = torch.device(device)
        self.log_dir = os.path.join(args.run, "logs", args.doc)
        self.tb_dir = os.path.join(args.run, "tensorboard", args.doc)
        self.ckpt_path = os.path.join(self.log_dir, "checkpoint.pth")
        self._signal = None
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if dist else 0  # under torchrun; 0 and 1 for a plain run
        self.world = torch.distributed.get_world_size() if dist else 1

    def shard(self, n):
        """(start, stop) of this rank's share of n items: contiguous, sizes differing by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    # -- checkpoints ------------------------------------------------------------------------------------
    def checkpoint(self, model, ema, optimizer, generator, step, steps_per_epoch, seed):
        epoch, batch = divmod(step, steps_per_epoch)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,  # EMA weights when model.ema is on
            "optimizer": optimizer.state_dict(),
            "step": step,  # the last completed step; training goes on at step + 1
            "epoch": epoch,  # the epoch of the next batch ...
            "batch_in_epoch": batch,  # ... and its position inside that epoch
            "config": config_to_dict(self.config),
            "seed": seed,
            "rng": {"generator": generator.get_state(), "generator_device": generator.device.type,
                    "torch_cpu": torch.get_rng_state()},
        }

    def save(self, state, numbered):
        """checkpoint_<step>.pth (when numbered) and checkpoint.pth, atomically; rank 0 only."""
        if self.rank != 0:
            return
        step = state["step"]
        if numbered:
            path = os.path.join(self.log_dir, f"checkpoint_{step}.pth")
            atomic_torch_save(state, path)
            tmp = f"{self.ckpt_path}.tmp.{os.getpid()}"
            try:  # checkpoint.pth as a hard link to the same bytes, swapped in atomically
                os.link(path, tmp)
                os.replace(tmp, self.ckpt_path)
            except OSError:
                if os.path.exists(tmp):
                    os.remove(tmp)
                atomic_torch_save(state, self.ckpt_path)
            self._prune_snapshots()
        else:
            atomic_torch_save(state, self.ckpt_path)
        log.info("step %d: saved %s", step, f"checkpoint_{step}.pth and checkpoint.pth" if numbered
                 else "checkpoint.pth")

    def _prune_snapshots(self):
        keep = self.config.training.keep_snapshots
        if keep <= 0:
            return
        for _, name in numbered_snapshots(self.log_dir)[:-keep]:
            os.remove(os.path.join(self.log_dir, name))

    def latest_checkpoint(self):
        """The newest complete snapshot of the run, for --resume_training; None if it has none yet.

        checkpoint.pth is normally the newest; a numbered snapshot is newer only when a crash came between
        writing checkpoint_<step>.pth and swapping checkpoint.pth to it.
        """
        if not os.path.isdir(self.log_dir):
            raise NCSNError(f"no run folder {self.log_dir} to resume: train it first (without --resume_training)")
        numbered = numbered_snapshots(self.log_dir)
        if not os.path.exists(self.ckpt_path) and not numbered:
            log.warning("%s holds no checkpoint yet (stopped before its first snapshot): starting at step 1",
                        self.log_dir)
            return None
        ckpt = load_checkpoint(self.ckpt_path, self.device) if os.path.exists(self.ckpt_path) else None
        if numbered and (ckpt is None or numbered[-1][0] > ckpt["step"]):
            path = os.path.join(self.log_dir, numbered[-1][1])
            log.warning("resuming from %s, newer than checkpoint.pth", path)
            ckpt = load_checkpoint(path, self.device)
        return ckpt

    def _check_resumable(self, ckpt):
        old, new = ckpt["config"], config_to_dict(self.config)
        arch = [k for k in ("model.ngf", "model.num_classes", "data.channels", "data.image_size")
                if old.get(k.split(".")[0], {}).get(k.split(".")[1]) != new[k.split(".")[0]][k.split(".")[1]]]
        if arch:
            k = arch[0]
            s, f = k.split(".")
            raise NCSNError(f"checkpoint {self.ckpt_path} is of a different architecture: it has {k} = "
                            f"{old.get(s, {}).get(f)!r}, the config asks for {new[s][f]!r}")
        changed = [k for k in config_differences(old, new) if k not in RESUMABLE_CHANGES]
        if changed:
            raise NCSNError(f"the config differs from the checkpoint's in {', '.join(changed)}: resuming needs "
                            f"the same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        for k in config_differences(old, new):
            log.info("resuming with %s changed", k)

    # -- training -----------------------------------------------------------------------------------------
    def train(self):
        cfg, args, device = self.config, self.args, self.device
        tcfg = cfg.training
        if not args.resume_training and (os.path.exists(self.log_dir) or os.path.exists(self.tb_dir)):
            raise NCSNError(f"run folder {self.log_dir} already exists: pick another --doc, or pass "
                            f"--resume_training to continue it")
        ckpt = self.latest_checkpoint() if args.resume_training else None
        if ckpt is not None:
            self._check_resumable(ckpt)
        seed = ckpt["seed"] if ckpt else args.seed
        if ckpt and seed != args.seed:
            log.info("resuming with the run's seed %d (not --seed %d)", seed, args.seed)

        train_u8 = load_mnist(cfg.data.root, train=True).to(device)  # (N, 28, 28) uint8
        test_u8 = load_mnist(cfg.data.root, train=False).to(device)  # (N_test, 28, 28) uint8
        n, bs = len(train_u8), tcfg.batch_size
        steps_per_epoch = math.ceil(n / bs)
        n_total = min(tcfg.n_iters, tcfg.n_epochs * steps_per_epoch)

        torch.manual_seed(seed)
        model = make_model(cfg, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, 0.999),
                                     weight_decay=cfg.optim.weight_decay, amsgrad=cfg.optim.amsgrad,
                                     fused=True if cfg.fast.fused_adam else None)
        generator = torch.Generator(device).manual_seed(seed)  # the same stream on every rank
        sigmas = get_sigmas(cfg.model.sigma_begin, cfg.model.sigma_end, cfg.model.num_classes).to(device)
        ema = make_ema(model) if cfg.model.ema else None
        start = self.load_state(ckpt, model, ema, optimizer, generator)
        if start >= n_total:
            raise NCSNError(f"the checkpoint is at step {start} and the config ends at step {n_total}: "
                            f"raise training.n_iters (or n_epochs) to train further")
        self.barrier()  # every rank has checked the run folder before rank 0 writes into it
        writer = self._make_run_folders()
        log.info("%s at step %d of %d (%d steps an epoch of %d images, batch %d%s); %d parameters",
                 "resuming" if start else "training", start + 1, n_total, steps_per_epoch, n, bs,
                 f" over {self.world} ranks" if self.world > 1 else "", sum(p.numel() for p in model.parameters()))

        net = model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
        to_model, _ = data_space(cfg)
        score_fn = make_score_fn(net, cfg, device, sigmas)
        eval_score_fn = make_score_fn(ema if ema is not None else model, cfg, device, sigmas)  # for the test loss

        from tqdm import tqdm
        bar = tqdm(total=n_total, initial=start, disable=None if self.rank == 0 else True, desc="train")
        window = []  # (step, per-sample loss, labels) on the device, read back every log_freq steps
        perm, perm_epoch = None, None
        old_handlers = self._catch_signals()
        try:
            for step in range(start + 1, n_total + 1):
                epoch, i = divmod(step - 1, steps_per_epoch)
                if perm_epoch != epoch:
                    perm, perm_epoch = epoch_permutation(seed, epoch, n).to(device), epoch
                # the whole global batch's noise is drawn on every rank, which keeps its slice: the run is the
                # same for any number of ranks, and resumes with any number
                idx = perm[i * bs:(i + 1) * bs]  # (B,) global batch
                u, labels, z = batch_noise(generator, len(idx), len(sigmas), device)
                own = slice(*self.shard(len(idx)))
                x = to_model(dequantize(train_u8[idx[own]], u=u[own]))  # (b, 1, 28, 28)
                model.train()
                loss, _ = dsm_loss(score_fn, x, sigmas, labels=labels[own], z=z[own],
                                   anneal_power=tcfg.anneal_power)
                optimizer.zero_grad(set_to_none=True)
                (loss.sum() * self.world / len(idx)).backward()  # DDP averages: the mean over the global batch
                optimizer.step()
                if ema is not None:
                    ema_update(ema, model, cfg.model.ema_rate)
                window.append((step, loss.detach(), labels[own]))

                snapshot = step % tcfg.snapshot_freq == 0 or step == n_total
                if step % tcfg.log_freq == 0 or step % tcfg.test_freq == 0 or snapshot or \
                        (self._signal and self.world == 1):
                    last, stop = self._flush(window, writer, sigmas, len(idx))
                    window = []
                    bar.set_postfix(loss=f"{last:.4f}", refresh=False)
                    bar.update(step - bar.n)
                else:
                    stop = None
                if step % tcfg.test_freq == 0 and self.rank == 0:
                    test_loss = self.test_loss(eval_score_fn, to_model, test_u8, sigmas, seed, step)
                    writer.add_scalar("test_loss", test_loss, step)
                    log.info("step %d: loss %.4f, test loss %.4f", step, last, test_loss)
                if snapshot or stop:
                    writer.flush()
                    self.save(self.checkpoint(model, ema, optimizer, generator, step, steps_per_epoch, seed),
                              numbered=snapshot)
                k = cfg.eval.every_snapshots
                if snapshot and k and (step // tcfg.snapshot_freq) % k == 0 and self.rank == 0:
                    self._metrics_during_training(eval_score_fn, sigmas, test_u8, step, seed)
                if stop:
                    signame = signal.Signals(stop).name
                    raise Interrupted(stop, f"{signame} at step {step}: checkpoint written, continue "
                                            f"with --resume_training --doc {args.doc}")
        finally:
            self._restore_signals(old_handlers)
            bar.close()
            writer.close()
        log.info("done: %d steps, checkpoint in %s", n_total, self.ckpt_path)
        return 0

    def load_state(self, ckpt, model, ema, optimizer, generator):
        """Restore model, EMA, optimizer and RNG from `ckpt` (None: a fresh start); returns the last done step."""
        if ckpt is None:
            return 0
        load_model_state(model, ckpt["model"], self.ckpt_path)
        if ema is not None:
            load_model_state(ema, ckpt["ema"], self.ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the kernel choice is this run's config's, not the checkpoint's
            group["fused"] = True if self.config.fast.fused_adam else None
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch_cpu"].cpu())
        if rng["generator_device"] == generator.device.type:
            generator.set_state(rng["generator"].cpu())
        else:  # a CPU and a CUDA generator have different states: continue with a derived stream
            generator.manual_seed(ckpt["seed"] * 1_000_003 + ckpt["step"])
            log.warning("checkpoint made on %s, resumed on %s: the random stream differs from an unbroken run",
                        rng["generator_device"], generator.device.type)
        return ckpt["step"]

    def _flush(self, window, writer, sigmas, batch):
        """Read the window's losses back from the device (summed over ranks), stop on a non-finite one, log them
        to TensorBoard. Returns (the last step's loss, the signal to stop on or None): under DDP the ranks
        agree here on stopping, so a signal takes effect at the next log step."""
        sums = torch.stack([loss.sum() for _, loss, _ in window] + [torch.tensor(float(self._signal or 0),
                                                                                  device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        sums = sums.tolist()  # one device sync for W steps
        stop = int(sums.pop() > 0) and (self._signal or signal.SIGTERM)
        for (step, loss, labels), total in zip(window, sums):
            value = total / batch
            if not math.isfinite(value):
                levels = sorted(set(labels[~torch.isfinite(loss)].tolist()))
                raise NCSNError(f"non-finite loss at step {step} at noise level(s) "
                                f"{', '.join(f'{i} (sigma {float(sigmas[i]):.4g})' for i in levels) or '(another rank)'}"
                                f": stopped; the last good checkpoint is kept")
            writer.add_scalar("loss", value, step)
        log.debug("step %d: loss %.5f", window[-1][0], value)
        return value, stop or None

    def test_loss(self, score_fn, to_model, test_u8, sigmas, seed, step):
        """DSM loss on a test batch; its randomness is a function of (seed, step), so resume needs no state."""
        g = torch.Generator(self.device).manual_seed((seed * 7_919 + step) % (2 ** 63))
        idx = torch.randint(len(test_u8), (self.config.training.batch_size,), generator=g, device=self.device)
        with torch.no_grad():
            loss, _ = dsm_loss(score_fn, to_model(dequantize(test_u8[idx], g)), sigmas, g,
                               anneal_power=self.config.training.anneal_power)
        return float(loss.mean())

    def _make_run_folders(self):
        """Rank 0 makes the run folder, writes config.yml and logs to stdout.txt; returns the TensorBoard
        writer (one that writes nothing on other ranks)."""
        if self.rank != 0:
            return NullWriter()
        try:
            for d in (self.log_dir, self.tb_dir):
                os.makedirs(d, exist_ok=True)
            for f in os.listdir(self.log_dir):  # our own temporary files, left by a crash mid-write
                if ".pth.tmp." in f:
                    os.remove(os.path.join(self.log_dir, f))
                    log.info("removed %s, a checkpoint write cut off by a crash", f)
            probe = os.path.join(self.log_dir, f".write_test.{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
            with open(os.path.join(self.log_dir, "config.yml"), "w") as f:
                yaml.safe_dump(config_to_dict(self.config), f, sort_keys=False)
        except OSError as e:
            raise NCSNError(f"cannot write the run folder {self.log_dir}: {e.strerror}") from e
        handler = logging.FileHandler(os.path.join(self.log_dir, "stdout.txt"))
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s - %(message)s"))
        log.addHandler(handler)
        log.info("run %s: %s", self.args.doc, " ".join(f"{k}={v}" for k, v in vars(self.args).items()))
        from tensorboardX import SummaryWriter
        return SummaryWriter(self.tb_dir, filename_suffix=f".{time.time_ns()}")  # unique name per writer

    def _catch_signals(self):
        def handler(signum, frame):
            if self._signal is None:
                log.warning("%s received: stopping after this step", signal.Signals(signum).name)
            self._signal = signum

        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            return {}

    @staticmethod
    def _restore_signals(old):
        for s, h in old.items():
            signal.signal(s, h)

    # -- sampling -----------------------------------------------------------------------------------------
    def load_trained(self):
        """The run's checkpoint, ready to sample: (config, score function, sigmas on the device).

        The model and data settings are the checkpoint's; `sampling` and `fast` come from --config when it
        is given. With model.ema on and sampling.ema on, the EMA weights are used.
        """
        device = self.device
        ckpt = load_checkpoint(self.ckpt_path, device)
        try:
            run_cfg = config_from_dict(ckpt["config"], source=f"config in {self.ckpt_path}")
        except ConfigError as e:
            raise NCSNError(str(e)) from e
        if self.config is not None:
            log.info("sampling and speed settings from --config %s; the model's from the checkpoint",
                     self.args.config)
            run_cfg = dataclasses.replace(run_cfg, sampling=self.config.sampling, fast=self.config.fast,
                                          eval=self.config.eval)
        model = make_model(run_cfg, device)
        use_ema = run_cfg.model.ema and run_cfg.sampling.ema
        load_model_state(model, ckpt["ema"] if use_ema else ckpt["model"], self.ckpt_path)
        model.eval()
        sigmas = get_sigmas(run_cfg.model.sigma_begin, run_cfg.model.sigma_end, run_cfg.model.num_classes).to(device)
        log.info("model of step %d%s; %d levels x %d steps, step_lr %g%s, seed %d", ckpt["step"],
                 " (EMA weights)" if use_ema else "", len(sigmas), run_cfg.sampling.n_steps_each,
                 run_cfg.sampling.step_lr, ", final denoising step" if run_cfg.sampling.denoise else "",
                 self.args.seed)
        return run_cfg, make_score_fn(model, run_cfg, device, sigmas), sigmas, ckpt["step"]

    def _output_paths(self, names):
        out = self.args.image_folder
        paths = {k: os.path.join(out, k) for k in names}
        present = [p for p in paths.values() if os.path.exists(p)]
        if present and not self.args.overwrite:
            raise NCSNError(f"{', '.join(present)} already exist: choose another -o or pass --overwrite")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise NCSNError(f"cannot create the image folder {out}: {e.strerror}") from e
        if not os.access(out, os.W_OK):
            raise NCSNError(f"the image folder {out} is not writable")
        return paths

    def sample(self):
        """Annealed Langevin dynamics from U[0, 1] noise with the run's checkpoint; writes into -o:
        samples.png (grid), samples.pt (raw final tensor) and movie.gif (the trajectory)."""
        device = self.device
        run_cfg, score_fn, sigmas, _ = self.load_trained()
        scfg = run_cfg.sampling
        names = self._output_paths(["samples.png", "samples.pt", "movie.gif"])
        generator = self.sampling_generator()
        total = len(sigmas) * scfg.n_steps_each
        frame_steps = set(np.linspace(1, total, min(scfg.n_frames, total)).round().astype(int).tolist())
        n_grid = min(scfg.n_samples, scfg.batch_size, 100)
        frames, counter = [], [0]
        _, to_image = data_space(run_cfg)

        def record(i, t, x):  # n_frames evenly spaced steps of the first batch become the movie
            counter[0] += 1
            if counter[0] in frame_steps:
                frames.append(to_image(x[:n_grid]).clamp(0, 1).cpu())

        t0 = time.time()
        lo, hi = self.shard(scfg.n_samples)  # under torchrun each rank draws its share, with its own seed
        samples = draw_samples(score_fn, sigmas, run_cfg, hi - lo, generator, device, callback=record)
        samples = self.gather(samples)
        log.info("sampled %d images in %.1f s", scfg.n_samples, time.time() - t0)
        if self.rank == 0:
            write_samples(samples, frames, names, to_image)
            log.info("wrote %s", ", ".join(names.values()))
        return 0

    def sampling_generator(self):
        """The generator of --sample and --eval: --seed on rank 0, seed + 1,000,003 x rank on the others."""
        return torch.Generator(self.device).manual_seed(self.args.seed + 1_000_003 * self.rank)

    def gather(self, x):
        """Concatenate every rank's tensor in rank order (on all ranks); x itself when not distributed."""
        if self.world == 1:
            return x
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, x.cpu())
        return torch.cat(parts)

    def evaluate(self):
        """--eval: FID, Inception-style score, digit shares and confidence of eval.n_samples(_cpu) samples of
        the run's checkpoint against the MNIST test set, and the DSM loss of the whole test set at each noise
        level; appended to <run>/logs/<doc>/metrics.json and written to TensorBoard at the checkpoint's step."""
        import metrics

        device = self.device
        run_cfg, score_fn, sigmas, step = self.load_trained()
        n = run_cfg.eval.n_samples if device.type == "cuda" else run_cfg.eval.n_samples_cpu
        test_u8 = load_mnist(run_cfg.data.root, train=False).to(device)
        classifier = metrics.get_classifier(run_cfg.data.root, device)
        reference = metrics.reference_stats(classifier, metrics.to_unit(test_u8))
        t0 = time.time()
        lo, hi = self.shard(n)
        generator = self.sampling_generator()
        samples = self.gather(draw_samples(score_fn, sigmas, run_cfg, hi - lo, generator, device))
        seconds = time.time() - t0
        to_model, to_image = data_space(run_cfg)
        result = metrics.sample_metrics(to_image(samples), classifier, reference)
        n_loss = run_cfg.eval.loss_images if device.type == "cuda" else run_cfg.eval.loss_images_cpu
        levels = test_loss_per_level(score_fn, to_model, test_u8[:n_loss], sigmas, run_cfg.training.anneal_power,
                                     self.args.seed)
        record = {"step": step, "fid": result["fid"], "inception_score": result["inception_score"],
                  "mean_confidence": result["mean_confidence"], "class_shares": result["class_shares"],
                  "n_samples": n, "sampling_seconds": seconds, "seed": self.args.seed,
                  "test_loss_per_level": levels, "test_loss_images": min(n_loss, len(test_u8))}
        log.info("step %d, %d samples (%.0f s): FID %.2f, Inception-style score %.2f, confidence %.3f", step, n,
                 seconds, result["fid"], result["inception_score"], result["mean_confidence"])
        log.info("test DSM loss per level: %s", ", ".join(f"{v:.3f}" for v in levels))
        if self.rank == 0:
            self._record_metrics(record, levels)
        return 0

    def _metrics_during_training(self, score_fn, sigmas, test_u8, step, seed):
        """FID and friends of eval.n_training samples of the current (EMA) model; its own generator, so the
        training stream is untouched."""
        import metrics

        cfg = self.config
        if not hasattr(self, "_classifier"):
            self._classifier = metrics.get_classifier(cfg.data.root, self.device)
            self._reference = metrics.reference_stats(self._classifier, metrics.to_unit(test_u8))
        t0 = time.time()
        generator = torch.Generator(self.device).manual_seed(seed * 31 + step)
        samples = draw_samples(score_fn, sigmas, cfg, cfg.eval.n_training, generator, self.device)
        result = metrics.sample_metrics(data_space(cfg)[1](samples), self._classifier, self._reference)
        log.info("step %d: FID %.2f, Inception-style score %.2f on %d samples (%.0f s)", step, result["fid"],
                 result["inception_score"], cfg.eval.n_training, time.time() - t0)
        self._record_metrics({"step": step, "n_samples": cfg.eval.n_training, **result})

    def _record_metrics(self, record, levels=None):
        """Append a record to metrics.json (atomically) and its scalars to TensorBoard."""
        path = os.path.join(self.log_dir, "metrics.json")
        records = []
        if os.path.exists(path):
            with open(path) as f:
                records = json.load(f)
        records.append(record)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, path)
        from tensorboardX import SummaryWriter
        with SummaryWriter(self.tb_dir, filename_suffix=f".{time.time_ns()}") as writer:
            for k in ("fid", "inception_score", "mean_confidence"):
                writer.add_scalar(f"metrics/{k}", record[k], record["step"])
            for i, v in enumerate(levels or []):
                writer.add_scalar(f"test_loss/level_{i}", v, record["step"])

    def noise_design(self):
        """Print the noise levels and Langevin step that NCSNv2's rules (techniques 1, 2 and 4 of Song & Ermon,
        2020) choose for the training data and the config's sigma_end and n_steps_each."""
        cfg = self.config
        train_u8 = load_mnist(cfg.data.root, train=True)
        t0 = time.time()
        sigma_begin, (i, j) = max_pairwise_distance(train_u8.float() / 255)
        dim = cfg.data.channels * cfg.data.image_size ** 2
        gamma = noise_ratio_gamma(dim)
        n_levels = num_noise_levels(sigma_begin, cfg.model.sigma_end, gamma)
        step_lr = langevin_step_lr(cfg.model.sigma_end, gamma, cfg.sampling.n_steps_each)
        print(f"largest distance between two of the {len(train_u8)} training images (pixels in [0, 1]): "
              f"{sigma_begin:.4f} (images {i} and {j}; {time.time() - t0:.0f} s)")
        print(f"gamma for D = {dim}: {gamma:.5f}; levels from {sigma_begin:.4f} to {cfg.model.sigma_end}: "
              f"{n_levels}; step_lr for n_steps_each = {cfg.sampling.n_steps_each}: {step_lr:.4g}")
        print(f"model: {{sigma_begin: {sigma_begin:.4f}, sigma_end: {cfg.model.sigma_end}, num_classes: {n_levels}}}")
        print(f"sampling: {{n_steps_each: {cfg.sampling.n_steps_each}, step_lr: {step_lr:.4g}}}")
        return 0

    def inpaint(self, kind):
        """Complete MNIST test digits with `kind` of region hidden; writes inpaint_<kind>.png into -o with three
        rows of images: the originals, what the sampler sees (hidden pixels grey), the completions."""
        device = self.device
        run_cfg, score_fn, sigmas, _ = self.load_trained()
        scfg = run_cfg.sampling
        names = self._output_paths([f"inpaint_{kind}.png"])
        if run_cfg.data.logit_transform:
            raise NCSNError("--inpaint works on runs in pixel space (data.logit_transform: false)")
        generator = torch.Generator(device).manual_seed(self.args.seed)
        test_u8 = load_mnist(run_cfg.data.root, train=False)
        n = min(scfg.n_samples, 10)
        idx = torch.randperm(len(test_u8), generator=torch.Generator().manual_seed(self.args.seed))[:n]
        known = dequantize(test_u8[idx], None).to(device)  # (n, 1, 28, 28)
        mask = inpainting_mask(kind, known.shape, generator, device)
        x0 = torch.rand(known.shape, generator=generator, device=device)
        t0 = time.time()
        completed = anneal_langevin_dynamics(score_fn, x0, sigmas, scfg.n_steps_each, scfg.step_lr, generator,
                                             denoise=scfg.denoise, known=known, mask=mask)
        log.info("inpainted %d digits (%s hidden) in %.1f s", n, kind, time.time() - t0)
        from torchvision.utils import save_image
        shown = torch.where(mask, known, torch.full_like(known, 0.5))
        save_image(torch.cat([known, shown, completed.clamp(0, 1)]).cpu(), names[f"inpaint_{kind}.png"], nrow=n,
                   padding=2)
        log.info("wrote %s", names[f"inpaint_{kind}.png"])
        return 0


def test_loss_per_level(score_fn, to_model, test_u8, sigmas, anneal_power, seed, batch_size=500):
    """The DSM loss (eq. 6) of the whole test set at each noise level separately: a list of L floats."""
    out = []
    for i in range(len(sigmas)):
        g = torch.Generator(test_u8.device).manual_seed(seed * 7_919 + i)
        total = 0.0
        with torch.no_grad():
            for b in range(0, len(test_u8), batch_size):
                x = to_model(dequantize(test_u8[b:b + batch_size], g))
                labels = torch.full((len(x),), i, dtype=torch.long, device=x.device)
                total += float(dsm_loss(score_fn, x, sigmas, g, labels=labels, anneal_power=anneal_power)[0].sum())
        out.append(total / len(test_u8))
    return out


def draw_samples(score_fn, sigmas, config, n, generator, device, callback=None):
    """n samples by annealed Langevin dynamics from U[0, 1] noise, in batches of sampling.batch_size;
    `callback` sees the first batch only. Returns the raw final tensor (n, 1, 28, 28) on the CPU."""
    scfg, batches = config.sampling, []
    for b in range(0, n, scfg.batch_size):
        m = min(scfg.batch_size, n - b)
        x0 = torch.rand(m, config.data.channels, config.data.image_size, config.data.image_size,
                        generator=generator, device=device)  # (m, 1, 28, 28) ~ U[0, 1]
        if config.data.logit_transform:
            x0 = logit_transform(x0)
        batches.append(anneal_langevin_dynamics(score_fn, x0, sigmas, scfg.n_steps_each, scfg.step_lr, generator,
                                                callback=callback if b == 0 else None,
                                                denoise=scfg.denoise).cpu())
    return torch.cat(batches)


def write_samples(samples, frames, names, to_image):
    """The grid PNG, the raw tensor and the GIF of the trajectory frames."""
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    images = to_image(samples).clamp(0, 1)
    save_image(images, names["samples.png"], nrow=math.ceil(math.sqrt(len(images))), padding=2)
    atomic_torch_save(samples, names["samples.pt"])
    nrow = math.ceil(math.sqrt(len(frames[0])))
    pil = [Image.fromarray(make_grid(f, nrow=nrow, padding=2)[0].mul(255).round().byte().numpy(), mode="L")
           for f in frames]
    pil[0].save(names["movie.gif"], save_all=True, append_images=pil[1:], duration=[60] * (len(pil) - 1) + [2000],
                loop=0)
