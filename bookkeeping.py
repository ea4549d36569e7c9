"""What the training loop does around the method's step, so that runner.train reads like the paper's loop: reading
the losses back and logging them, progress, the test loss, checkpoints, the snapshot grid, the on_snapshot hook,
stop signals, and the time budget (which may leave room for the sampling command after it).

Its own module: runner.py holds the method, the loop and sampling; this holds the loop's chores. It imports none of
runner.py: what it needs of the method comes through the training state (runner.TrainState: its test loss, its
snapshot grid, the evaluations of a --sample).
"""
import functools
import logging
import math
import signal
import time

import numpy as np
import torch

from build import WEIGHTS, sampling_path, sampling_weights, timed_sampling_step, warm_up_sampling
from checkpoint import save_checkpoint
from common import Interrupted, NCSNError
from progress import Progress, duration
from rundir import write_snapshot_grid
from speedpath import path_of

log = logging.getLogger("ncsn")

SAMPLING_START_SECONDS = 20  # what --sample spends besides its network evaluations: starting Python and torch,
#                              reading the checkpoint, writing the PNG, tensor and GIF (about 10 s on a 2-core CPU)
TIMED_EVALUATIONS = 5  # the sampling network's evaluations timed for the budget (after one that builds its kernels)
SAMPLING_MARGIN = 1.5  # the estimate takes the timed evaluations this many times: a few timed at the start ran
#                        faster than --sample's whole chain (AVX2: 0.091 s timed, 0.157 s over its 300 steps)


def training_deadline(state, t_start):
    """The time.time() at which training.max_minutes ends this command's training (None: no budget), counted from
    the command's start `t_start`. With training.budget_includes_sampling the budget covers one --sample of the
    run too: training stops earlier by the time that sampling is measured to take here (sampling_seconds)."""
    tcfg = state.config.training
    if not tcfg.max_minutes:
        return None
    deadline = t_start + 60 * tcfg.max_minutes
    if tcfg.budget_includes_sampling:
        seconds, per_eval, evals = sampling_seconds(state)
        deadline -= seconds
        log.info("training.max_minutes %g covers one --sample too: %d samples take about %s here (%d network "
                 "evaluations timed at %.3g s each, taken %g times, + %d s to start and write), so training stops %s "
                 "after the start", tcfg.max_minutes, state.config.sampling.n_samples, duration(seconds), evals,
                 per_eval, SAMPLING_MARGIN, SAMPLING_START_SECONDS, duration(deadline - t_start))
    return deadline


def sampling_seconds(state):
    """(seconds, seconds an evaluation, evaluations) that --sample of this run will take on this machine: its
    network evaluations at the sampling batch timed on the path --sample runs here (build.sampling_path: with
    fast.auto it may differ from training's), on the training network where the paths agree, else on a network of
    the sampling path, compiled as --sample compiles it (the first call building the kernels, which --sample then
    finds in the compile cache), times the evaluations of sampling.n_samples and SAMPLING_MARGIN, plus
    SAMPLING_START_SECONDS."""
    evals, batch = state.sampling_evaluations()
    config, times = sampling_path(state.config, state.device, batch, state.sigmas), []
    if path_of(config) == path_of(state.config):  # the training network itself, as --sample will compile it
        evaluation = functools.partial(warm_up_sampling(state.config, state.device, batch), state.model)
    else:  # a network of the sampling path's own (its speed does not depend on the weights)
        evaluation = timed_sampling_step(state.device, batch, state.sigmas)(config)
    for _ in range(TIMED_EVALUATIONS + 1):
        t0 = time.perf_counter()
        evaluation()
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        times.append(time.perf_counter() - t0)
    per_eval = float(np.median(times[1:]))
    return evals * per_eval * SAMPLING_MARGIN + SAMPLING_START_SECONDS, per_eval, evals


class Bookkeeping:
    """What the training loop does around the method's step: read the losses back and log them (every
    training.log_freq steps), progress, the test loss (test_freq), checkpoints (snapshot_freq, the last step, a
    stop signal, the time budget), the snapshot grid and the on_snapshot hook at each numbered checkpoint.
    Under torchrun the ranks agree on a stop signal and the budget at log steps (one all-reduce for both)."""

    def __init__(self, state, writer, signals, deadline, on_snapshot, test_u8, resume_command):
        self.state, self.writer, self.signals, self.deadline = state, writer, signals, deadline
        self.on_snapshot, self.test_u8, self.resume_command = on_snapshot, test_u8, resume_command
        self.window = []  # (step, per-sample loss, levels, global batch) on the device, read back at log steps
        self.last = float("nan")  # the loss of the last log step
        tcfg = state.config.training
        self.progress = Progress(state.n_total, "train", "steps", initial=state.step, on=state.device,
                                 enabled=state.run.rank == 0, deadline=deadline, short_hint=(
                                     f"the run ends short of training.n_iters, and samples less well than a run "
                                     f"that reaches it; more time: --set training.max_minutes=M (now "
                                     f"{tcfg.max_minutes:g}), or continue later with --resume_training"))

    def after_step(self, loss, levels, batch):
        """The bookkeeping after step state.step with this rank's per-sample loss and levels of its global batch of
        `batch` images. Returns True when the time budget ends the run here (a numbered checkpoint written);
        raises Interrupted after a stop signal (a checkpoint written)."""
        state, tcfg, step = self.state, self.state.config.training, self.state.step
        self.window.append((step, loss, levels, batch))
        self.progress.update(1)
        snapshot = step % tcfg.snapshot_freq == 0 or step == state.n_total
        stop, out_of_time = self.log_step() if self.reads_back(step, snapshot) else (None, False)
        if step % tcfg.test_freq == 0 and state.run.rank == 0:
            test, weights = state.test_loss(self.test_u8), sampling_weights(state.config)
            self.writer.add_scalar(f"test_loss/{weights}", test, step)
            log.info("step %d: training loss (raw weights) %.4f, test loss (%s weights) %.4f", step, self.last,
                     WEIGHTS[weights], test)
        numbered = snapshot or out_of_time  # the budget ends the run as its last step would
        if numbered or stop:
            self.writer.flush()
            save_checkpoint(state.run, state.checkpoint(), numbered=numbered, keep_snapshots=tcfg.keep_snapshots)
        if numbered:
            self.after_snapshot()
        if stop:
            raise Interrupted(stop, f"{signal.Signals(stop).name} at step {step}: checkpoint written, continue "
                                    f"with: {self.resume_command}")
        if out_of_time:
            log.info("training.max_minutes (%g) reached at step %d of %d: checkpoint written; another budget: %s",
                     tcfg.max_minutes, step, state.n_total, self.resume_command)
        return out_of_time

    def reads_back(self, step, snapshot):
        """Whether the losses are read back after `step`: at log and test steps, at a snapshot, and at once after a
        stop signal or past the time budget in a single process (under torchrun the ranks agree on both at those
        steps only: one all-reduce)."""
        tcfg, alone = self.state.config.training, self.state.run.world == 1
        signalled = alone and self.signals.signum is not None
        return step % tcfg.log_freq == 0 or step % tcfg.test_freq == 0 or snapshot or signalled or \
            (alone and self.past_deadline())

    def past_deadline(self):
        """Whether this rank's clock is past the time budget (never without one)."""
        return self.deadline is not None and time.time() >= self.deadline

    def log_step(self):
        """Read the window's losses back and log them; returns (the stop signal every rank heard of, or None;
        whether the time budget is spent, on any rank)."""
        state = self.state
        self.last = log_losses(self.window, self.writer, state.sigmas, state.run)
        self.window = []
        self.progress.note(f"training loss {self.last:.4f}")
        # one all-reduce for both
        heard, spent = state.run.any_rank((self.signals.signum, self.past_deadline()), state.device)
        return (self.signals.signum or signal.SIGTERM) if heard else None, spent and state.step < state.n_total

    def after_snapshot(self):
        """The snapshot grid (rank 0, when training.snapshot_grid is on) and the on_snapshot hook (every rank)."""
        state = self.state
        if state.config.training.snapshot_grid and state.run.rank == 0:
            t0 = time.time()
            images, evals = state.snapshot_grid()  # (n, 1, 28, 28) in [0, 1]
            self.writer.add_image("snapshot_grid", write_snapshot_grid(state.run, state.step, images), state.step)
            log.info("step %d: snapshot grid of %d samples (%d network evaluations each) in %.1f s", state.step,
                     len(images), evals, time.time() - t0)
        if self.on_snapshot is not None:
            self.on_snapshot(state, self.test_u8)  # on every rank: it may use collectives

    def close(self):
        self.progress.close()
        self.writer.close()


def log_losses(window, writer, sigmas, run):
    """Read the window's training losses (of the raw weights) back from the device (summed over ranks: one sync for
    the window), stop on a non-finite one, write each step's mean over its global batch to TensorBoard as
    train_loss/raw, and the mean of each noise level over the window's samples at that level as
    train_loss/raw/level_<i> at its last step; returns the last step's loss."""
    L = len(sigmas)
    losses, labels = torch.cat([loss for _, loss, _, _ in window]), torch.cat([lv for _, _, lv, _ in window])
    level_sums = torch.zeros(L, device=losses.device).index_add_(0, labels, losses.float())  # (L,)
    level_counts = torch.bincount(labels, minlength=L).to(level_sums.dtype)  # (L,)
    step_sums = torch.stack([loss.sum() for _, loss, _, _ in window]).float()  # (W,)
    sums = torch.cat([step_sums, level_sums, level_counts])  # (W + 2L,): one read-back for all
    if run.world > 1:
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    sums = sums.tolist()
    for (step, loss, labels, batch), total in zip(window, sums[:len(window)]):
        value = total / batch
        if not math.isfinite(value):
            levels = sorted(set(labels[~torch.isfinite(loss)].tolist()))
            raise NCSNError(f"non-finite loss at step {step} at noise level(s) "
                            f"{', '.join(f'{i} (sigma {float(sigmas[i]):.4g})' for i in levels) or '(another rank)'}"
                            f": stopped; the last good checkpoint is kept")
        writer.add_scalar("train_loss/raw", value, step)
    level_sums, level_counts = sums[len(window):len(window) + L], sums[len(window) + L:]
    for i, (total, count) in enumerate(zip(level_sums, level_counts)):
        if count:  # a level no sample of the window drew has no value here
            writer.add_scalar(f"train_loss/raw/level_{i}", total / count, step)
    log.debug("step %d: training loss %.5f", step, value)
    return value
