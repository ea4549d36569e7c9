"""Checkpoints: the dict a run is saved as, writing it atomically, reading it back, choosing the snapshot to resume
from, the resumability check and restoring a run's state from it.

A checkpoint is one dict with named keys holding only tensors and plain values, so it loads with
torch.load(weights_only=True). This module imports none of runner.py: what restore needs comes as arguments.
"""
import logging
import mmap
import os
import pickle
import struct
import zipfile
import zlib

import torch

import devices
from common import NCSNError, atomic_torch_save, derive_seed, numbered_snapshots, replace_file, snapshot_name
from schema import ConfigError, config_from_dict, config_to_dict, with_legacy_values

log = logging.getLogger("ncsn")

CHECKPOINT_FORMAT = 1
VERIFY_CHUNK = 1 << 22  # bytes read at a time when checking a compressed member's CRC-32
LOCAL_HEADER = b"PK\x03\x04"  # the signature of a zip member's local header
DOS_DIRECTORY = 0x10  # the folder bit of a zip member's external attributes (torch.save never sets it)
# Keys that fix the network's shape: a checkpoint with other values cannot be loaded.
ARCHITECTURE_KEYS = ("model.ngf", "model.num_classes", "data.channels", "data.image_size")
# Keys a resumed run may change; any other difference to the checkpoint's config is an error.
RESUMABLE_CHANGES = {
    "training.n_epochs", "training.n_iters", "training.snapshot_freq", "training.test_freq", "training.log_freq",
    "training.keep_snapshots", "training.max_minutes", "training.budget_includes_sampling", "training.snapshot_grid",
    "training.snapshot_steps_each",
    "data.root", "model.ema_warmup",
    "sampling.n_steps_each", "sampling.step_lr", "sampling.n_samples", "sampling.batch_size", "sampling.n_frames",
    "sampling.denoise", "sampling.ema", "sampling.init", "sampling.guidance_scale", "sampling.sampler",
    "fast.auto", "fast.bf16", "fast.fast_kernels", "fast.fused_adam", "fast.channels_last", "fast.tf32",
    "fast.cudnn_benchmark", "fast.compile", "fast.compile_norms",
    "eval.n_samples", "eval.every_snapshots", "eval.n_training", "eval.loss_images",
    "eval.max_minutes"}


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NCSNError(f"checkpoint {path} holds a different architecture: "
                        f"{str(e).splitlines()[0]}") from e


def make_checkpoint(config, model, ema, optimizer, generator, step, seed, speed_paths=()):
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
        "speed_paths": list(speed_paths),  # [{"first", "last", "path", "machine"}]: which path trained which steps
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
        try:  # checkpoint.pth as a hard link to the same bytes, swapped in atomically (where the file system has
            os.link(path, tmp)  # no hard links, e.g. FAT, a copy is written instead)
            replace_file(tmp, run.ckpt_path)
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


def damage(path):
    """What is wrong with the checkpoint file at `path` ("damaged (CRC mismatch in data/12)", ...), or None when it
    is a whole zip archive whose every member matches its CRC-32.

    torch.save writes a zip archive: data.pkl holds the pickled dict (the config, step, seed and the tensors'
    places), data/<n> each tensor's bytes (the model, EMA and optimizer state, the RNG states); every member
    carries a CRC-32 in the archive's directory, which torch.load does not check. This reads every member's bytes
    once, where torch.load finds them (after the local header: its name is checked against the directory's, its
    lengths say where the bytes begin), and checks that the directory does not mark it a folder (torch's reader
    would then load it as empty bytes); docs/checkpoints.md has its cost. Other header fields and the alignment
    padding are checked by torch's own zip reader (miniz, what torch.load reads with): it opens the archive and finds
    every member's header, and what it refuses is damage too. Any exception from walking the directory or inflating
    a member is damage, not a traceback; a flip that none of this sees changes nothing that is loaded
    (tests/test_checkpoints.py flips every bit of a small checkpoint's zip structure to show it). OSError (the file
    cannot be read) and MemoryError are not the file's fault and go to the caller."""
    if os.path.getsize(path) == 0:
        return "truncated (0 bytes)"
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            infos = z.infolist()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for info in infos:
                        problem = member_damage(z, view, info)
                        if problem is not None:
                            return problem
                finally:
                    view.release()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            zip_start = f.read(4) == LOCAL_HEADER
        return "truncated (no zip directory at its end)" if zip_start else \
            "not a checkpoint of this code (not a zip archive)"
    except (OSError, MemoryError):
        raise
    except Exception as e:  # struct.error, ValueError, NotImplementedError, ...: the directory's bytes are wrong
        return f"damaged (its zip directory: {first_line(e)[:200]})"
    return torch_reader_damage(path)


def torch_reader_damage(path):
    """What torch's zip reader finds wrong with the archive (the fields it checks that zipfile does not: sizes of a
    stored member, disk numbers, encryption flags, ...), or None. It reads the directory and each member's local
    header, not the members' bytes."""
    try:
        reader = torch._C.PyTorchFileReader(os.fspath(path))
        for name in reader.get_all_records():
            reader.get_record_offset(name)
    except RuntimeError as e:
        problem = str(e).split(". This is an internal", 1)[0].replace("PytorchStreamReader ", "")
        return f"damaged (torch's zip reader {problem[:200]})"
    return None


def member_damage(z, view, info):
    """damage() of one member of the open archive `z`, whose file's bytes are `view`."""
    member = info.filename.split("/", 1)[-1]  # without torch's top folder ("archive/")
    if info.external_attr & DOS_DIRECTORY:  # torch's reader (miniz) reads a member marked a folder as empty bytes
        return f"damaged (the zip directory marks {member} a folder)"
    off = info.header_offset
    if view[off:off + 4] != LOCAL_HEADER:
        return f"damaged (the local header of {member} is missing)"
    name_len, extra_len = struct.unpack("<HH", view[off + 26:off + 30])
    name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    if view[off + 30:off + 30 + name_len] != name:
        return f"damaged (the local header of {member} names another file)"
    start = off + 30 + name_len + extra_len
    if start + info.compress_size > len(view):
        return f"truncated (in {member})"
    if info.compress_type == zipfile.ZIP_STORED:  # what torch writes: the bytes as they are
        crc = zlib.crc32(view[start:start + info.compress_size])
        return None if crc == info.CRC else f"damaged (CRC mismatch in {member})"
    try:  # compressed (not torch's own writer): zipfile inflates it and checks the CRC-32 at the end
        with z.open(info) as f:
            while f.read(VERIFY_CHUNK):
                pass
    except (OSError, MemoryError):
        raise
    except Exception as e:  # BadZipFile, zlib.error, NotImplementedError (an unknown method), a password asked, ...
        return f"damaged (CRC mismatch in {member})" if str(e).startswith("Bad CRC-32") else \
            f"damaged (in {member}: {first_line(e)[:200]})"
    return None


def newest_intact(log_dir, exclude):
    """(file name, step) of the run's newest numbered snapshot in `log_dir` that verifies, other than the file
    `exclude`; None if there is none."""
    for step, name in reversed(numbered_snapshots(log_dir)) if os.path.isdir(log_dir) else []:
        path = os.path.join(log_dir, name)
        try:
            if not (exclude and same_file(path, exclude)) and damage(path) is None:
                return name, step
        except OSError:
            continue  # unreadable: not one to suggest
    return None


def same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def way_out(path):
    """What to use instead of the damaged checkpoint `path`: the newest intact snapshot beside it, as --ckpt."""
    found = newest_intact(os.path.dirname(path), path)
    if found is None:
        return f"no other snapshot in {os.path.dirname(path)} is intact (main.py --verify lists them)"
    return f"the newest intact snapshot is {found[0]}, use it with --ckpt {found[1]}"


class CheckpointError(NCSNError):
    """A checkpoint file that cannot be used; `problem` says why, e.g. "damaged (CRC mismatch in data/12)"."""

    def __init__(self, path, problem):
        super().__init__(f"checkpoint {path} is {problem}")
        self.path, self.problem = path, problem


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose bytes are wrong: it fails its check (damage()). Resume may fall back from it."""


class UnloadableCheckpoint(CheckpointError):
    """A checkpoint whose bytes pass their check but that does not load here: not enough memory, a file that this
    torch cannot unpickle, a file of other code, a file that cannot be read. Resume stops at it (falling back would
    train steps again from an older snapshot for a cause that is not the file's)."""


def first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict in `path` (weights_only=True, onto `device`) after damage() passed. DamagedCheckpoint
    when its bytes fail the check; UnloadableCheckpoint, naming the cause, when intact bytes do not load (memory,
    unpickling, a foreign file) or the file cannot be read."""
    try:
        problem = damage(path)
    except OSError as e:
        raise UnloadableCheckpoint(path, f"unreadable ({e.strerror or e})") from e
    if problem is not None:
        raise DamagedCheckpoint(path, problem)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except MemoryError as e:
        raise UnloadableCheckpoint(path, f"intact, but loading its {os.path.getsize(path):,} bytes onto {device} ran "
                                         f"out of memory (MemoryError): free memory and try again") from e
    except pickle.UnpicklingError as e:
        raise UnloadableCheckpoint(path, f"intact, but torch {torch.__version__} cannot unpickle it with "
                                         f"weights_only=True ({first_line(e)[:200]}): made by other code or another "
                                         f"torch version") from e
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise UnloadableCheckpoint(path, f"intact, but loading it onto {device} ran out of memory "
                                             f"({first_line(e)[:200]})") from e
        if "PytorchStreamReader" in str(e):  # a zip archive, but not one torch.save wrote
            raise UnloadableCheckpoint(path, f"not a checkpoint of this code (an intact zip archive that torch does "
                                             f"not read: {first_line(e)[:200]})") from e
        raise
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UnloadableCheckpoint(path, f"not a checkpoint of this code (no 'format': {CHECKPOINT_FORMAT})")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint dict with weights_only=True onto `device`, after checking every CRC-32 of the file
    (damage); a one-line NCSNError if it is missing, damaged or unreadable, naming the newest intact snapshot."""
    if not os.path.isfile(path):
        raise NCSNError(f"no checkpoint at {path}: train this run first")
    try:
        return read_checkpoint(path, device)
    except DamagedCheckpoint as e:
        raise NCSNError(f"{e}: {way_out(path)}") from e


def latest_checkpoint(run):
    """The newest snapshot of the run that verifies and loads, for --resume_training, on the CPU (restore moves
    it to the run's device); None if the run has no checkpoint yet.

    checkpoint.pth is normally the newest; a numbered snapshot is newer only when a crash came between writing
    checkpoint_<step>.pth and swapping checkpoint.pth to it. A file whose bytes fail their check (damage) is
    skipped with a warning naming it, why, and the steps that will be trained again; no file is changed. A file
    that passes its check but does not load (memory, unpickling, another program's file) is never skipped: its
    UnloadableCheckpoint ends the command. A run where none verifies is a one-line NCSNError.
    """
    if not os.path.isdir(run.log_dir):
        raise NCSNError(f"no run folder {run.log_dir} to resume: train it first (without --resume_training)")
    numbered = numbered_snapshots(run.log_dir)
    if not os.path.exists(run.ckpt_path) and not numbered:
        log.warning("%s holds no checkpoint yet (stopped before its first snapshot): starting at step 1",
                    run.log_dir)
        return None
    skipped = []  # (file name, its step if numbered, what is wrong)
    ckpt, chosen, latest_failed = None, None, None
    if os.path.exists(run.ckpt_path):
        try:
            ckpt, chosen = read_checkpoint(run.ckpt_path), "checkpoint.pth"
        except DamagedCheckpoint as e:
            skipped.append(("checkpoint.pth", None, e.problem))
            latest_failed = e.problem
    for step, name in reversed(numbered):
        if ckpt is not None and step <= ckpt["step"]:
            break
        path = os.path.join(run.log_dir, name)
        if latest_failed is not None and same_file(path, run.ckpt_path):  # the same bytes: no second read
            skipped.append((name, step, f"{latest_failed} (the same file as checkpoint.pth)"))
            continue
        try:
            newer = read_checkpoint(path)
        except DamagedCheckpoint as e:
            skipped.append((name, step, e.problem))
            continue
        if ckpt is not None:
            log.warning("resuming from %s, newer than checkpoint.pth", path)
        ckpt, chosen = newer, name
        break
    if ckpt is None:
        raise NCSNError(f"no checkpoint in {run.log_dir} verifies, nothing to resume from: "
                        f"{skipped_list(skipped)}; nothing was changed: start afresh under another --doc")
    if skipped:
        step = ckpt["step"]
        lost = max((s for _, s, _ in skipped if s is not None), default=step)
        again = (f"steps {step + 1} to {lost} are trained again" if lost > step else
                 f"any steps after {step} that checkpoint.pth held are trained again" if latest_failed else "")
        log.warning("resuming from step %d (%s): %s%s", step, chosen, skipped_list(skipped),
                    f"; {again}" if again else "")
    return ckpt


def skipped_list(skipped):
    """'checkpoint.pth is damaged (...), checkpoint_30.pth is damaged (...)' of (name, step, problem) triples."""
    return ", ".join(f"{name} is {problem}" for name, _, problem in skipped)


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
    Adam, which needs them there. Fused Adam is this run's choice (devices.use_fused_adam), not the checkpoint's.
    The moments take their parameter's layout: a run resumed on another layout (fast.channels_last, which fast.auto
    may choose) has channels_last parameters and NCHW moments, and fused Adam on the CPU walks both as one flat
    array, pairing each weight with another weight's moments."""
    load_model_state(model, ckpt["model"], path)
    if ema is not None:
        load_model_state(ema, ckpt["ema"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    device = next(model.parameters()).device
    fused = devices.use_fused_adam(config, device)
    for group in optimizer.param_groups:
        group["fused"] = fused
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if fused or group.get("capturable") else "cpu")
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's strides
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch_cpu"].cpu())
    if rng["generator_device"] == generator.device.type:
        generator.set_state(rng["generator"].cpu())
    else:  # a CPU and a CUDA generator have different states: continue with a derived stream
        generator.manual_seed(derive_seed(ckpt["seed"], "resume_other_device", ckpt["step"]))
        log.warning("checkpoint made on %s, resumed on %s: the random stream differs from an unbroken run",
                    rng["generator_device"], generator.device.type)
    return ckpt["step"]


def verify_run(run):
    """--verify: check every checkpoint file of the run `run` (rundir.Run; damage, then a load); one line each on
    stdout: the file, its step, its size, ok or what is wrong. Returns 0 when all are intact; otherwise a one-line
    NCSNError naming the newest intact snapshot (exit status 1)."""
    if not os.path.isdir(run.log_dir):
        raise NCSNError(f"no run folder {run.log_dir} to verify: check --run and --doc")
    files = [(step, name) for step, name in numbered_snapshots(run.log_dir)]
    if os.path.exists(run.ckpt_path):
        files.append((None, "checkpoint.pth"))
    if not files:
        raise NCSNError(f"{run.log_dir} holds no checkpoint to verify")
    width, failed = max(len(name) for _, name in files), 0
    for step, name in files:
        path = os.path.join(run.log_dir, name)
        size = os.path.getsize(path)
        try:
            ckpt = read_checkpoint(path)
            held = ckpt["step"] if isinstance(ckpt.get("step"), int) else None
            if step is not None and held != step:
                raise DamagedCheckpoint(path, f"not what its name says (it holds step {held})")
            verdict = "ok"
        except CheckpointError as e:
            held, verdict, failed = step, e.problem, failed + 1
        twin = [n for _, n in files[:-1] if same_file(os.path.join(run.log_dir, n), path)] if step is None else []
        verdict += f" (the same file as {twin[0]})" if twin else ""
        print(f"{name:<{width}}  step {held if held is not None else '?':>7}  {size:>13,} bytes  {verdict}", flush=True)
    if failed:
        found = newest_intact(run.log_dir, None)
        raise NCSNError(f"{failed} of {len(files)} checkpoint files in {run.log_dir} fail the check: " +
                        (f"the newest intact snapshot is {found[0]}, use it with --ckpt {found[1]}" if found
                         else "none of its numbered snapshots is intact"))
    log.info("all %d checkpoint files in %s are intact", len(files), run.log_dir)
    return 0
