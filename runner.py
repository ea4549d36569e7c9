"""Denoising score matching, annealed Langevin dynamics and the training loop of NCSN on MNIST.

Read top to bottom: the method's pure functions (`dsm_loss`, eq. 5 and 6 of Song & Ermon, 2019;
`anneal_langevin_dynamics`, their Algorithm 1; `consistent_annealed_sampling`, the optional sampler of
Jolicoeur-Martineau et al., 2021; EMA), the training loop (`train` with its `TrainState` and `Bookkeeping`) and
sampling (`sample`). Every function takes plain values: main.py reads the flags. The noise levels and the check
that a sampler setting can run are noise.py's; the network (fresh or of a checkpoint), its score function and the
optimizer are built in build.py; the run folder and what is written into it are rundir.py's, the checkpoint file
and resume's checks are checkpoint.py's, the order of the batches data.py's.
"""
import copy
import dataclasses
import logging
import math
import os
import time

import numpy as np
import torch

import devices
from build import (compile_model, make_model, make_optimizer, make_score_fn, read_trained, sampling_weights,
                   trained_network, training_path, warm_up_training)
from checkpoint import check_resumable, latest_checkpoint, make_checkpoint, restore
from common import NCSNError, derive_seed
from data import (MNIST_MEAN, EpochOrder, batch_noise, data_space, dequantize, dsm_noise, load_mnist,
                  logit_transform)
from bookkeeping import Bookkeeping, training_deadline
from noise import check_training_samplers, config_sigmas, consistent_eta, consistent_levels, snapshot_grid_sampling
from progress import EarlyLog, Progress, duration
from speedpath import record
from rundir import Run, RunLock, StopSignals, make_run_folders, output_paths, write_samples

log = logging.getLogger("ncsn")

EMA_WARMUP_STEPS = 10  # the warm-up decay (1 + t) / (EMA_WARMUP_STEPS + t): 0.1 at t = 0, 0.99 at t = 890


# ----------------------------------------------------------------------------------------------------------
# The method

def dsm_loss(score_fn, x, sigmas, generator=None, labels=None, anneal_power=2.0, z=None):
    """Denoising score matching loss per sample, eq. (5) and (6) of the paper.

    For each sample a level i ~ U{0..L-1} and z ~ N(0, I), drawn by data.dsm_noise unless given:
        x~ = x + sigma_i z,    l_i = 1/2 ||s(x~, i) + z / sigma_i||^2 * sigma_i ** anneal_power
    (the target -(x~ - x) / sigma_i^2 is -z / sigma_i). Returns (loss (B,), labels (B,)); the training
    objective is loss.mean(). Randomness comes only from `generator` (or the labels and z given).
    """
    labels, z = dsm_noise(generator, x.shape, len(sigmas), x.device, labels, z, dtype=x.dtype)  # (B,), like x
    sigma = sigmas.to(x.device)[labels].view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
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


def consistent_annealed_sampling(score_fn, x, sigmas, step_lr, generator=None, callback=None, denoise=False):
    """Consistent annealed sampling (CAS), Algorithm 2 of Jolicoeur-Martineau et al. (2021), "Adversarial score
    matching and improved sampling for image generation".

    One step per level, from sigma_1 down to sigma_L, sized so that a sample carrying Gaussian noise of sigma_i
    carries exactly sigma_{i+1} after it (Algorithm 1 with several steps a level does not: its noise at the end
    of a level depends on step_lr and n_steps_each):
        eta = step_lr / sigma_L^2,   alpha_i = eta sigma_i^2   (the step size of Algorithm 1 at level i)
        x <- x + alpha_i s(x, i) + beta_i sigma_{i+1} z,   beta_i = sqrt(1 - (1 - eta)^2 sigma_i^2 / sigma_{i+1}^2)
    (with s = -(x - x_0) / sigma_i^2 the step keeps (1 - eta) sigma_i of the noise; the fresh noise makes up the
    rest of sigma_{i+1}; for a geometric sequence sigma_i / sigma_{i+1} is the paper's gamma). The chain ends at
    sigma_L after L - 1 steps (network evaluations). score_fn(x, labels) is the score at sigmas[labels];
    callback(i, 0, x) is called after the step into level i. denoise: as in anneal_langevin_dynamics.
    It needs 1 - sigma_{i+1} / sigma_i <= eta <= 1 at every step (consistent_eta).
    """
    sigmas = [float(s) for s in sigmas]
    eta = consistent_eta(sigmas, step_lr)
    with torch.inference_mode():
        for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
            labels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (B,)
            beta = math.sqrt(max(0.0, 1 - (1 - eta) ** 2 * (sigma / sigma_next) ** 2))
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + eta * sigma ** 2 * score_fn(x, labels).to(x.dtype) + beta * sigma_next * z
            if callback is not None:
                callback(i + 1, 0, x)
        if denoise:
            labels = torch.full((x.shape[0],), len(sigmas) - 1, dtype=torch.long, device=x.device)  # (B,)
            x = x + sigmas[-1] ** 2 * score_fn(x, labels).to(x.dtype)
    return x


def score_between_levels(score_fn, sigmas, levels):
    """The score at each of `levels` from a network that knows only the trained `sigmas`: the trained level i
    nearest in log sigma and its denoised estimate D(x) = x + sigma_i^2 s(x, i) (Tweedie's formula), held for
    level j: s(x, levels_j) = (D(x) - x) / levels_j^2 = s(x, i) sigma_i^2 / levels_j^2. Exact at the trained
    levels, and wherever D does not depend on the noise level (a point mass). Returns score(x, j), j (B,)."""
    nearest = (levels.log()[:, None] - sigmas.log()[None, :]).abs().argmin(1)  # (n,) index into sigmas
    scale = (sigmas[nearest] / levels) ** 2  # (n,)

    def score(x, j):  # x (B, 1, 28, 28), j (B,)
        return score_fn(x, nearest[j]) * scale[j].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return score


def learning_rate(step, optim, n_total):
    """The learning rate of training step `step` (1, 2, ..., n_total) under optim.lr_schedule and optim.warmup:
    lr * step / warmup during the warm-up, then lr (constant) or lr * 0.5 (1 + cos(pi p)) (cosine), with p the
    share of the steps after the warm-up already taken (0 at the first, (n - 1) / n at the last)."""
    if step <= optim.warmup:
        return optim.lr * step / optim.warmup
    if optim.lr_schedule == "constant":
        return optim.lr
    progress = (step - 1 - optim.warmup) / max(1, n_total - optim.warmup)
    return optim.lr * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(step, rate, warmup):
    """The EMA decay used after training step `step` (1, 2, ...): `rate`, or with the warm-up
    min(rate, (1 + t) / (10 + t)) with t = step - 1, so the random initial weights fade within a few hundred
    steps instead of keeping a share rate ** step (22% after 1,500 steps at 0.999)."""
    if not warmup:
        return rate
    t = step - 1
    return min(rate, (1 + t) / (EMA_WARMUP_STEPS + t))


@torch.no_grad()
def ema_update(ema, model, rate):
    """theta_ema <- rate * theta_ema + (1 - rate) * theta (NCSNv2, technique 5)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - rate)


def make_ema(model):
    """A frozen copy of the model whose weights will track the exponential moving average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------------------------------------
# Training

@dataclasses.dataclass
class TrainState:
    """What one training run holds between steps; `checkpoint()` is all of it as one dict."""
    config: object  # schema.Config
    run: Run
    device: torch.device
    seed: int
    model: torch.nn.Module  # the unwrapped network: its state_dict is what checkpoints hold
    net: torch.nn.Module  # the network the step calls: `model`, or `model` under DDP
    ema: torch.nn.Module  # or None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the training stream: the same on every rank
    sigmas: torch.Tensor  # (L,)
    score_fn: object  # s(x, i) of `net`, built once: what the loss calls
    to_model: object  # pixels in [0, 1] -> the model's space (data.data_space)
    n_total: int  # the run's last step: where a cosine learning rate reaches 0
    step: int = 0  # the last completed step
    given: object = None  # the config as given (fast.auto unresolved): what checkpoints hold
    path: tuple = ("", 1, ())  # (this command's speed path (speedpath.py), its first step, the earlier ranges')

    @classmethod
    def create(cls, config, run, device, seed, n_total, ckpt=None):
        """A fresh run (ckpt None) or the run in `ckpt`, on one code path: build, then restore."""
        lo, hi = run.shard(config.training.batch_size)  # this rank's share of a batch: what a step feeds the net
        given, sigmas = config, config_sigmas(config).to(device)  # the config as given, fast.auto unresolved
        config, path = training_path(config, device, run.world, hi - lo, sigmas, ckpt, dsm_loss)
        devices.set_precision(config, device)
        torch.manual_seed(seed)
        model = make_model(config, device)
        ema = make_ema(model) if config.model.ema else None
        optimizer = make_optimizer(config, model)
        generator = torch.Generator(device).manual_seed(seed)
        step = restore(ckpt, model, ema, optimizer, generator, config, run.ckpt_path) if ckpt else 0
        compile_model(model, config, warm_up_training(config, device, hi - lo))  # the EMA copy stays eager
        net = model
        if run.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
        net.train()
        return cls(config, run, device, seed, model, net, ema, optimizer, generator, sigmas,
                   make_score_fn(net, config, device, sigmas), data_space(config)[0], n_total, step, given,
                   (path, step + 1, list(ckpt.get("speed_paths") or []) if ckpt else []))

    def sampling_score_fn(self):
        """s(x, i) of the weights --sample uses (build.sampling_weights): grids, test loss, metrics."""
        weights = self.ema if sampling_weights(self.config) == "ema" else self.model
        return make_score_fn(weights, self.config, self.device, self.sigmas)

    def checkpoint(self):
        return make_checkpoint(self.given or self.config, self.model, self.ema, self.optimizer, self.generator,
                               self.step, self.seed, record(*self.path, self.step, self.device))

    def test_loss(self, test_u8):
        """DSM loss of the sampling weights (build.sampling_weights: the EMA's or the raw) on a test batch of
        `test_u8`; its randomness is a function of (seed, step), so resume needs no state."""
        cfg, device = self.config, self.device
        g = torch.Generator(device).manual_seed(derive_seed(self.seed, "test_batch", self.step))
        idx = torch.randint(len(test_u8), (cfg.training.batch_size,), generator=g, device=device)
        with torch.no_grad():
            loss, _ = dsm_loss(self.sampling_score_fn(), self.to_model(dequantize(test_u8[idx], g)), self.sigmas, g,
                               anneal_power=cfg.training.anneal_power)
        return float(loss.mean())

    def snapshot_grid(self):
        """training.snapshot_grid samples of the sampling weights in [0, 1] (n, 1, 28, 28), drawn with
        training.snapshot_steps_each steps a level (snapshot_grid_sampling) from a generator of their own (the
        training stream is untouched); and the network evaluations of each."""
        cfg = self.config
        scfg = snapshot_grid_sampling(cfg, self.sigmas)
        g = torch.Generator(self.device).manual_seed(derive_seed(self.seed, "snapshot_grid", self.step))
        x = draw_samples(self.sampling_score_fn(), self.sigmas, dataclasses.replace(cfg, sampling=scfg),
                         cfg.training.snapshot_grid, g, self.device)
        return data_space(cfg)[1](x).clamp(0, 1), sampler_steps(scfg, self.sigmas) + scfg.denoise

    def sampling_evaluations(self):
        """(network evaluations, batch) of one --sample with this run's sampling settings."""
        scfg = self.config.sampling
        batch = min(scfg.batch_size, scfg.n_samples)
        return (sampler_steps(scfg, self.sigmas) + scfg.denoise) * math.ceil(scfg.n_samples / batch), batch

    def train_step(self, images_u8, order):
        """One optimisation step on the global batch `order` (B,) of `images_u8`; returns this rank's
        per-sample loss (b,) and levels (b,). The whole global batch's noise is drawn on every rank, which keeps
        its slice: the run is the same for any number of ranks, and resumes with any number."""
        cfg = self.config
        u, labels, z = batch_noise(self.generator, len(order), len(self.sigmas), self.device,
                                   stratified=cfg.training.stratified_levels)
        own = slice(*self.run.shard(len(order)))
        x = self.to_model(dequantize(images_u8[order[own]], u=u[own]))  # (b, 1, 28, 28)
        loss, _ = dsm_loss(self.score_fn, x, self.sigmas, labels=labels[own], z=z[own],
                           anneal_power=cfg.training.anneal_power)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step + 1, cfg.optim, self.n_total)
        self.optimizer.zero_grad(set_to_none=True)
        (loss.sum() * self.run.world / len(order)).backward()  # DDP averages: the mean over the global batch
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            ema_update(self.ema, self.model, ema_decay(self.step, cfg.model.ema_rate, cfg.model.ema_warmup))
        return loss.detach(), labels[own]


RESUME_HINT = "the same call with resume=True"  # how to continue a run when no command line is given


def train(config, run, device, seed, resume=False, on_snapshot=None, resume_command=RESUME_HINT, command="",
          signals=None):
    """Train the run `run` (rundir.Run) with the config and seed from step 1, or with `resume` continue it from its
    newest checkpoint (and its seed). `on_snapshot(state, test_u8)` runs on every rank after each numbered snapshot
    (evaluate.TrainingMetrics); `resume_command` is how messages say to continue, `command` what stdout.txt records.
    `signals` (rundir.StopSignals, from the command line) takes SIGINT and SIGTERM over: a step, a checkpoint, stop;
    without it no handler is installed. Stops at the last step or past training.max_minutes. Returns 0."""
    t_start, device = time.time(), torch.device(device)
    check_training_samplers(config)
    with RunLock(run) as lock:  # held from reading the run's checkpoints to the end: one training command a run
        ckpt = starting_checkpoint(run, config, resume, seed, lock)
        train_u8 = load_mnist(config.data.root, train=True).to(device)  # (N, 28, 28) uint8
        test_u8 = load_mnist(config.data.root, train=False).to(device)  # (N_test, 28, 28) uint8
        order = EpochOrder(ckpt["seed"] if ckpt else seed, len(train_u8), config.training.batch_size, device)
        n_total = min(config.training.n_iters, config.training.n_epochs * order.steps_per_epoch)
        if ckpt is not None and ckpt["step"] >= n_total:
            raise NCSNError(f"the checkpoint is at step {ckpt['step']} and the config ends at step {n_total}: train "
                            f"further with {resume_command} --set training.n_iters=N (N > {ckpt['step']})")
        run.barrier()  # every rank has checked the run folder before rank 0 writes into it
        with signals or StopSignals(install=False) as signals, EarlyLog() as early:  # a signal: stop after a step
            state = TrainState.create(config, run, device, order.seed, n_total, ckpt)
            deadline = training_deadline(state, t_start)
            writer = make_run_folders(run, config, device, early, lock, state.step, command)
            log.info("%s at step %d of %d (%d steps an epoch of %d images, batch %d%s); %d parameters%s",
                     "resuming" if state.step else "training", state.step + 1, n_total, order.steps_per_epoch,
                     order.n, order.batch_size, f" over {run.world} ranks" if run.world > 1 else "",
                     sum(p.numel() for p in state.model.parameters()),
                     f"; budget {config.training.max_minutes:g} min" if deadline else "")
            book = Bookkeeping(state, writer, signals, deadline, on_snapshot, test_u8, resume_command)
            try:
                while state.step < n_total:
                    batch = order.batch(state.step)  # (B,) the global batch
                    loss, levels = state.train_step(train_u8, batch)
                    if book.after_step(loss, levels, len(batch)):
                        return 0  # the time budget ended it
            finally:
                book.close()
    log.info("done: %d steps in %s, checkpoint in %s", n_total, duration(time.time() - t_start), run.ckpt_path)
    return 0


def starting_checkpoint(run, config, resume, seed, lock):
    """The checkpoint a training command starts from (None: step 1), read under the run folder's `lock`
    (rundir.RunLock), which it takes where the folder exists. A fresh start into a run folder that holds a
    checkpoint is refused; one that holds none (a start that stopped before its first checkpoint) is trained into
    afresh. A resume takes the newest intact snapshot (checkpoint.latest_checkpoint), checked against `config`."""
    if not resume:
        if os.path.exists(run.log_dir) or os.path.exists(run.tb_dir):
            if run.holds_checkpoint():
                raise NCSNError(f"run folder {run.log_dir} already exists: pick another --doc, or pass "
                                f"--resume_training to continue it")
            lock.take()  # refused while another command trains into it; make_run_folders checks again under the lock
            log.warning("run folder %s holds no checkpoint (a start that stopped before its first one): training "
                        "into it from step 1", run.log_dir)
        return None
    lock.take()
    ckpt = latest_checkpoint(run)  # on the CPU: restore moves it
    if ckpt is not None:
        check_resumable(ckpt, config, run.ckpt_path)
        if ckpt["seed"] != seed:
            log.info("resuming with the run's seed %d (not --seed %d)", ckpt["seed"], seed)
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# Sampling

def sampling_generator(run, device, seed):
    """The generator of --sample and --eval: --seed itself on rank 0, a derived stream on the others."""
    return torch.Generator(device).manual_seed(seed if run.rank == 0 else derive_seed(seed, "sampling_rank",
                                                                                       run.rank))


def initial_samples(config, sigmas, n, generator, device):
    """The start of the chain, (n, 1, 28, 28) in the model's space. sampling.init uniform: U[0, 1], the paper's.
    gaussian: MNIST's mean pixel + sigma_1 z, a draw from the first level's noise around the data's mean.

    Why gaussian exists: a U[0, 1] start has mean pixel 0.5, where at sigma_1 = 1 training only ever shows the
    network images whose mean pixel lies within about 0.13 +- 0.1 (the per-image mean of sigma_1 z has std
    sigma_1 / 28). There the learned score is an extrapolation and can hold the chain at white backgrounds;
    whether it does varies from one set of weights to the next (bench/quality.py counts such samples)."""
    shape = (n, config.data.channels, config.data.image_size, config.data.image_size)
    if config.sampling.init == "gaussian":
        x0 = MNIST_MEAN + float(sigmas[0]) * torch.randn(shape, generator=generator, device=device)
        return logit_transform(x0.clamp(0, 1)) if config.data.logit_transform else x0
    x0 = torch.rand(shape, generator=generator, device=device)  # U[0, 1]
    return logit_transform(x0) if config.data.logit_transform else x0


def draw_samples(score_fn, sigmas, config, n, generator, device, callback=None, score_for_batch=None,
                 desc=None, done=None, on_batch=None):
    """n samples of sampling.sampler (run_sampler) from `initial_samples` in batches of sampling.batch_size, the raw
    final tensor (n, 1, 28, 28) on the CPU; `callback` sees the first batch only. score_for_batch(start, stop): the
    score function of samples start..stop (guidance.py's digits). `desc`: progress of the steps under that name.
    `done`: the first samples, drawn before by this generator (whole batches; the generator at its state after
    them), to go on from. on_batch(samples so far) after each batch; the draw stops there when it returns True."""
    scfg, batches, start = config.sampling, [] if done is None else [done], 0 if done is None else len(done)
    with Progress(math.ceil((n - start) / scfg.batch_size) * sampler_steps(scfg, sigmas), desc or "", "steps",
                  on=device, enabled=desc is not None) as progress:
        for b in range(start, n, scfg.batch_size):
            x0 = initial_samples(config, sigmas, min(scfg.batch_size, n - b), generator, device)
            fn = score_fn if score_for_batch is None else score_for_batch(b, b + len(x0))

            def step(i, t, x, first=b == 0):
                if first and callback is not None:
                    callback(i, t, x)
                progress.update(1)
            batches.append(run_sampler(fn, x0, sigmas, scfg, generator, step).cpu())
            if on_batch is not None and on_batch(torch.cat(batches)):
                break
    return torch.cat(batches)


def run_sampler(score_fn, x0, sigmas, scfg, generator, callback=None):
    """The chain of sampling.sampler from x0: Algorithm 1 (langevin) or CAS over consistent_levels (consistent)."""
    if scfg.sampler == "consistent":
        levels = consistent_levels(sigmas, scfg.n_steps_each)
        return consistent_annealed_sampling(score_between_levels(score_fn, sigmas, levels), x0, levels, scfg.step_lr,
                                            generator, callback=callback, denoise=scfg.denoise)
    return anneal_langevin_dynamics(score_fn, x0, sigmas, scfg.n_steps_each, scfg.step_lr, generator,
                                    callback=callback, denoise=scfg.denoise)


def sampler_steps(scfg, sigmas):
    """Network evaluations of one chain of sampling.sampler, without the final denoising step."""
    if scfg.sampler == "consistent":
        return len(consistent_levels(sigmas, scfg.n_steps_each)) - 1  # one step into each level after the first
    return len(sigmas) * scfg.n_steps_each


def sample(config, run, device, seed, ckpt_path, out_folder, overwrite=False, guide=None):
    """--sample: the chain of sampling.sampler from sampling.init noise with the checkpoint file `ckpt_path` of the
    run `run` (rundir.Run), from the generator of `seed`; `config` (or None: the checkpoint's) gives the sampling
    settings (build.read_trained). Writes samples.png (grid), samples.pt (raw final tensor) and movie.gif (the
    trajectory) into `out_folder`, replacing files there only with `overwrite`.
    guide(run config, score_fn, sigmas) -> (score_for_batch, grid row length or None), when given, steers the
    samples (--digit: guidance.digit_guide); it is called before anything is written."""
    device = torch.device(device)
    run_cfg, ckpt = read_trained(ckpt_path, config)
    scfg = run_cfg.sampling
    lo, hi = run.shard(scfg.n_samples)  # under torchrun each rank draws its share, with its own seed
    score_fn, sigmas = trained_network(run_cfg, ckpt, ckpt_path, device, seed, min(scfg.batch_size, hi - lo),
                                       run.world)
    score_for_batch, nrow = guide(run_cfg, score_fn, sigmas) if guide is not None else (None, None)
    names = output_paths(out_folder, ["samples.png", "samples.pt", "movie.gif"], overwrite)
    total = sampler_steps(scfg, sigmas)
    frame_steps = set(np.linspace(1, total, min(scfg.n_frames, total)).round().astype(int).tolist())
    n_grid = min(scfg.n_samples, scfg.batch_size, 100)
    frames, counter, to_image = [], [0], data_space(run_cfg)[1]

    def record(i, t, x):  # n_frames evenly spaced steps of the first batch become the movie
        counter[0] += 1
        if counter[0] in frame_steps:
            frames.append(to_image(x[:n_grid]).clamp(0, 1).cpu())

    t0 = time.time()
    own_batch = None if score_for_batch is None else lambda a, b: score_for_batch(lo + a, lo + b)  # global indices
    samples = draw_samples(score_fn, sigmas, run_cfg, hi - lo, sampling_generator(run, device, seed), device,
                           callback=record, score_for_batch=own_batch, desc="sample" if run.rank == 0 else None)
    samples = run.gather(samples)
    log.info("sampled %d images in %.1f s", scfg.n_samples, time.time() - t0)
    if run.rank == 0:
        write_samples(samples, frames, names, to_image, nrow)
        log.info("wrote %s", ", ".join(names.values()))
    return 0
