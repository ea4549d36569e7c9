"""NCSN from Python (a notebook, a script): open a run, draw samples as a tensor, score a tensor, train for a number of
steps. Every call takes plain values and returns values.

    import ncsn
    run = ncsn.open_run("quick")              # run/logs/quick at its newest checkpoint
    x = run.sample(16, digit=3)               # (16, 1, 28, 28) in [0, 1], on the CPU
    scores = ncsn.score(x)                    # {"fid": ..., "kid": ..., "kid_se": ..., "inception_score": ..., ...}
    ncsn.train("quick", steps=500)            # 500 more steps of run/logs/quick

The same functions as the command line's (build.load_trained, runner.draw_samples, metrics.sample_metrics,
runner.train), without its files: only training writes (into the run), and the classifiers cache themselves beside
the data. The "ncsn" logger gets a handler on stderr when it has none, so that a notebook shows the log. No signal
handler is installed: Ctrl-C in a notebook interrupts a training as any cell, and the run keeps its last checkpoint
(main.py's training stops after the step instead, with a checkpoint).
"""
import dataclasses
import logging
import os

import torch

import devices
import metrics
from build import load_trained
from checkpoint import latest_checkpoint
from common import NCSNError, chosen_checkpoint
from data import data_space, load_mnist
from evaluate import TrainingMetrics, score_line
from noise import check_sampler, config_sigmas
from progress import setup_logging
from rundir import Run
from runner import draw_samples, train as train_run
from schema import config_from_dict, config_to_dict, load_config

log = logging.getLogger("ncsn")
SEED = 1234  # main.py's default --seed: run.sample(n) with n = sampling.n_samples draws what --sample draws
SCORE_KEYS = ("fid", "kid", "kid_se", "inception_score", "mean_confidence")  # what a score dict holds first
_references = {}  # (data root, device) -> (the metrics classifier, the test set's statistics): made once


def show_log(level="info"):
    """The "ncsn" logger's lines on stderr (progress.setup_logging), unless it has a handler already."""
    if not log.handlers:
        setup_logging(level)


@dataclasses.dataclass
class OpenRun:
    """A trained run, opened by open_run: its config (the checkpoint's network; sampling, eval, fast and data.root
    from the run's config.yml), the score function of its checkpoint's sampling weights on `device`, its noise
    levels and step."""
    config: object  # schema.Config
    score_fn: object  # s(x, i)
    sigmas: torch.Tensor  # (L,) on the device
    step: int
    device: torch.device
    seed: int = SEED

    def sample(self, n, digit=None, sampler=None, steps=None, step_lr=None, seed=None, guidance_scale=None):
        """n samples (n, 1, 28, 28) in [0, 1] on the CPU, drawn from `seed` (default: the run's) by the config's
        sampler, or by `sampler` ("langevin" or "consistent"), with `steps` steps a level (sampling.n_steps_each)
        and `step_lr` (sampling.step_lr) where given; with `digit` (0 to 9, or "all" for n / 10 of each) steered to
        that digit by classifier guidance at `guidance_scale` (default sampling.guidance_scale), as main.py --sample
        --digit does."""
        scfg = self.config.sampling
        scfg = dataclasses.replace(scfg, n_samples=n, sampler=sampler or scfg.sampler,
                                   n_steps_each=scfg.n_steps_each if steps is None else steps,
                                   step_lr=scfg.step_lr if step_lr is None else step_lr)
        config = config_from_dict(config_to_dict(dataclasses.replace(self.config, sampling=scfg)), "sample()")
        check_sampler(config.sampling, config_sigmas(config), NCSNError)
        score_for_batch = None
        if digit is not None:
            import guidance
            guide = guidance.digit_guide(str(digit), guidance_scale, self.device)
            score_for_batch = guide(config, self.score_fn, self.sigmas)[0]
        generator = torch.Generator(self.device).manual_seed(self.seed if seed is None else seed)  # --sample's
        x = draw_samples(self.score_fn, self.sigmas, config, n, generator, self.device, score_for_batch=score_for_batch,
                         desc="sample")  # (n, 1, 28, 28) in the model's space
        return data_space(config)[1](x).clamp(0, 1)

    def score(self, images):
        """score(images) against the MNIST test set of this run's data.root, on its device."""
        return score(images, self.config.data.root, self.device)


def open_run(doc, root="run", ckpt=None, device="auto", seed=SEED, sets=()):
    """The run `doc` under `root` (as main.py's --doc and --run) at its newest checkpoint, or at `ckpt` (a step or a
    checkpoint file, as --ckpt), on `device` ("auto", "cpu", "cuda", "mps"); `sets` are --set's "key=value" strings
    (sampling.*, eval.*, fast.*, data.root). Returns an OpenRun."""
    show_log()
    run = Run(root, doc)
    path = os.path.join(run.log_dir, "config.yml")
    if not os.path.isfile(path) and not os.path.isfile(run.ckpt_path):
        raise NCSNError(f"no run at {run.log_dir}: train it first (ncsn.train or main.py), or give root= and doc")
    config = load_config(path, sets) if os.path.isfile(path) else None
    device = devices.resolve_device(device)
    ckpt_path = chosen_checkpoint(run, None if ckpt is None else str(ckpt))
    config, score_fn, sigmas, step = load_trained(ckpt_path, config, device, seed)
    return OpenRun(config, score_fn, sigmas, step, device, seed)


def score(images, data_root="run/datasets", device="auto"):
    """FID, KID with its standard error, Inception-style score, confidence, digit shares and white share of
    `images` (N, 1, 28, 28) in [0, 1] against the MNIST test set in `data_root`, on the classifier of metrics.py
    (trained at its first use and cached beside the data): metrics.sample_metrics's dict, whose first keys are
    SCORE_KEYS. Logs the scores in one line with their count: FID compares only at one N (KID at any)."""
    show_log()
    device = devices.resolve_device(device) if isinstance(device, str) else torch.device(device)
    key = (os.path.abspath(data_root), str(device))
    if key not in _references:
        classifier = metrics.get_classifier(data_root, device)
        reference = metrics.reference_stats(classifier, metrics.to_unit(load_mnist(data_root, train=False)))
        _references[key] = classifier, reference
    result = metrics.sample_metrics(images, *_references[key])
    log.info("%s", score_line(result))
    return {**{k: result[k] for k in SCORE_KEYS}, **result}


def train(doc, steps, config="config.yml", root="run", device="auto", seed=SEED, sets=()):
    """Train the run `doc` under `root` for `steps` more steps: from its newest checkpoint with its own config.yml
    when it has a checkpoint (`sets` may then change only what a resume may: checkpoint.RESUMABLE_CHANGES), else
    from step 1 with the config file `config` (with `sets`, main.py --set's "key=value" strings), on `device` from
    `seed`. Writes into the run as main.py does (checkpoints, log, TensorBoard), with training.max_minutes as its
    budget. Returns the step of the run's newest checkpoint."""
    show_log()
    if not isinstance(steps, int) or steps < 1:
        raise NCSNError(f"train: steps must be a whole number >= 1, got {steps!r}")
    run, device = Run(root, doc), devices.resolve_device(device)
    resume = run.holds_checkpoint()
    start = latest_checkpoint(run)["step"] if resume else 0
    cfg = load_config(os.path.join(run.log_dir, "config.yml") if resume else config, sets)
    n_iters = start + steps  # and at least as many epochs as steps, so that the epochs do not end it earlier
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, n_iters=n_iters,
                                                                n_epochs=max(cfg.training.n_epochs, n_iters)))
    hook = TrainingMetrics(cfg) if cfg.eval.every_snapshots else None
    handlers = set(log.handlers)
    try:
        train_run(cfg, run, device, seed, resume, hook, resume_command=f"ncsn.train({doc!r}, steps=N)",
                  command=f"ncsn.train({doc!r}, {steps})")
    finally:  # the run's log file stays the run's: later calls log elsewhere
        for handler in set(log.handlers) - handlers:
            log.removeHandler(handler)
            handler.close()
    return latest_checkpoint(run)["step"]
