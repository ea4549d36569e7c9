"""Checkpoints: the dict a run is saved as, writing it atomically, reading it back, choosing the snapshot to resume
from, the resumability check and restoring a run's state from it.

A checkpoint is one dict with named keys holding only tensors and plain values, so it loads with
torch.load(weights_only=True). This module imports none of runner.py: what restore needs comes as arguments.
"""
import logging
import os

import torch

import devices
from common import NCSNError, atomic_torch_save, derive_seed, numbered_snapshots, snapshot_name
from schema import ConfigError, config_from_dict, config_to_dict, with_legacy_values

log = logging.getLogger("ncsn")

CHECKPOINT_FORMAT = 1
# Keys that fix the network's shape: a checkpoint with other values cannot be loaded.
ARCHITECTURE_KEYS = ("model.ngf", "model.num_classes", "data.channels", "data.image_size")
# Keys a resumed run may change; any other difference to the checkpoint's config is an error.
RESUMABLE_CHANGES = {
    "training.n_epochs", "training.n_iters", "training.snapshot_freq", "training.test_freq", "training.log_freq",
    "training.keep_snapshots", "data.root", "model.ema_warmup",
    "sampling.n_steps_each", "sampling.step_lr", "sampling.n_samples", "sampling.batch_size", "sampling.n_frames",
    "sampling.denoise", "sampling.ema", "sampling.init", "sampling.guidance_scale", "sampling.sampler",
    "fast.bf16", "fast.fast_kernels", "fast.fused_adam", "fast.channels_last", "fast.tf32", "fast.cudnn_benchmark",
    "fast.compile",
    "eval.n_samples", "eval.n_samples_cpu", "eval.every_snapshots", "eval.n_training", "eval.loss_images",
    "eval.loss_images_cpu"}


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NCSNError(f"checkpoint {path} holds a different architecture: "
                        f"{str(e).splitlines()[0]}") from e


def make_checkpoint(config, model, ema, optimizer, generator, step, seed):
    """The whole state of a run after `step` as one dict (model from the unwrapped module)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,  # EMA weights when model.ema is on
        "optimizer": optimizer.state_dict(),
        "step": step,  # the last completed step; training goes on at step + 1
        "config": config_to_dict(config),
        "seed": seed,  # the run's --seed: the data order and noise of every later step derive from it
        "rng": {"generator": generator.get_state(), "generator_device": generator.device.type,
                "torch_cpu": torch.get_rng_state()},
    }


def save_checkpoint(run, state, numbered, keep_snapshots):
    """checkpoint_<step>.pth (when numbered) and checkpoint.pth, atomically; rank 0 only."""
    if run.rank != 0:
        return
    step = state["step"]
    hint = (f"the snapshots before step {step} are intact: free space there, keep fewer snapshots "
            f"(training.keep_snapshots) or train into another --run")
    if numbered:
        path = os.path.join(run.log_dir, snapshot_name(step))
        atomic_torch_save(state, path, hint)
        tmp = f"{run.ckpt_path}.tmp.{os.getpid()}"
        try:  # checkpoint.pth as a hard link to the same bytes, swapped in atomically
            os.link(path, tmp)
            os.replace(tmp, run.ckpt_path)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            atomic_torch_save(state, run.ckpt_path, hint)
        if keep_snapshots > 0:
            for _, name in numbered_snapshots(run.log_dir)[:-keep_snapshots]:
                os.remove(os.path.join(run.log_dir, name))
    else:
        atomic_torch_save(state, run.ckpt_path, hint)
    log.info("step %d: saved %s", step, f"{snapshot_name(step)} and checkpoint.pth" if numbered
             else "checkpoint.pth")


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


def latest_checkpoint(run):
    """The newest complete snapshot of the run, for --resume_training, on the CPU (restore moves it to the run's
    device); None if it has none yet.

    checkpoint.pth is normally the newest; a numbered snapshot is newer only when a crash came between
    writing checkpoint_<step>.pth and swapping checkpoint.pth to it.
    """
    if not os.path.isdir(run.log_dir):
        raise NCSNError(f"no run folder {run.log_dir} to resume: train it first (without --resume_training)")
    numbered = numbered_snapshots(run.log_dir)
    if not os.path.exists(run.ckpt_path) and not numbered:
        log.warning("%s holds no checkpoint yet (stopped before its first snapshot): starting at step 1",
                    run.log_dir)
        return None
    ckpt = load_checkpoint(run.ckpt_path) if os.path.exists(run.ckpt_path) else None
    if numbered and (ckpt is None or numbered[-1][0] > ckpt["step"]):
        path = os.path.join(run.log_dir, numbered[-1][1])
        log.warning("resuming from %s, newer than checkpoint.pth", path)
        ckpt = load_checkpoint(path)
    return ckpt


def checkpoint_config(ckpt, path):
    """The config a checkpoint was trained with: keys it predates take their schema.LEGACY_VALUES, else their
    defaults; a config that no longer validates is a one-line NCSNError."""
    try:
        return config_from_dict(with_legacy_values(ckpt["config"]), source=f"config in {path}")
    except ConfigError as e:
        raise NCSNError(str(e)) from e


def config_differences(old, new):
    """Dotted keys whose values differ between two config dicts."""
    return sorted(f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k])


def check_resumable(ckpt, config, path):
    """Resuming needs the checkpoint's settings, except for RESUMABLE_CHANGES: a one-line error otherwise."""
    old, new = config_to_dict(checkpoint_config(ckpt, path)), config_to_dict(config)
    changed = config_differences(old, new)
    arch = [k for k in ARCHITECTURE_KEYS if k in changed]
    if arch:
        k = arch[0]
        s, f = k.split(".")
        raise NCSNError(f"checkpoint {path} is of a different architecture: it has {k} = "
                        f"{old.get(s, {}).get(f)!r}, the config asks for {new[s][f]!r}")
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        raise NCSNError(f"the config differs from the checkpoint's in {', '.join(refused)}: resuming needs "
                        f"the same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    for k in changed:
        log.info("resuming with %s changed", k)


def restore(ckpt, model, ema, optimizer, generator, config, path):
    """Load model, EMA, optimizer and RNG state from `ckpt` (best read onto the CPU) in place; returns its last
    completed step.

    The optimizer's moments go to their parameters' device; its `step` counters stay on the CPU, where torch keeps
    them for its default Adam (on the device every step would sync on them), and go to the device only for fused
    Adam, which needs them there. Fused Adam is this run's choice, as runner.make_optimizer makes it: fast.fused_adam
    and devices.fused_adam_ok, not the checkpoint's."""
    load_model_state(model, ckpt["model"], path)
    if ema is not None:
        load_model_state(ema, ckpt["ema"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    device = next(model.parameters()).device
    fused = True if config.fast.fused_adam and devices.fused_adam_ok(device) else None
    for group in optimizer.param_groups:
        group["fused"] = fused
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if fused or group.get("capturable") else "cpu")
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch_cpu"].cpu())
    if rng["generator_device"] == generator.device.type:
        generator.set_state(rng["generator"].cpu())
    else:  # a CPU and a CUDA generator have different states: continue with a derived stream
        generator.manual_seed(derive_seed(ckpt["seed"], "resume_other_device", ckpt["step"]))
        log.warning("checkpoint made on %s, resumed on %s: the random stream differs from an unbroken run",
                    rng["generator_device"], generator.device.type)
    return ckpt["step"]
