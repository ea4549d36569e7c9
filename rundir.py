"""The run folder: where a run lives (`Run`: its folders and this process's rank), making it, what a command
writes into it and into -o (sample grids, tensors, GIFs, the snapshot grid's PNG), the TensorBoard stand-in of
ranks other than 0, the stop signals a training command listens to and the lock it holds on the folder.

Its own module so that the method (runner.py) and the commands (evaluate.py, inpaint.py, checkpoint.py's
--verify) share one idea of the folder without importing each other; main.py decides the folders, these
functions make and fill them.
"""
import dataclasses
import errno
import io
import logging
import math
import os
import platform
import signal
import time

import torch
import yaml

from common import NCSNError, atomic_save_image, atomic_torch_save, atomic_write_bytes, numbered_snapshots
from schema import config_to_dict

log = logging.getLogger("ncsn")


# ----------------------------------------------------------------------------------------------------------
# Where a run lives and which process we are

@dataclasses.dataclass(frozen=True)
class Run:
    """The folders of one run (<run>/logs/<doc>, <run>/tensorboard/<doc>) and this process's rank under torchrun
    (0 of 1 for a plain run). A runtime object, not config."""
    root: str
    doc: str
    rank: int = 0
    world: int = 1

    @classmethod
    def from_distributed(cls, root, doc):
        """The run `doc` under `root` as this process sees it: its rank and the world size of torch.distributed
        when a process group is up (torchrun), else rank 0 of 1."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        return cls(root, doc, torch.distributed.get_rank() if dist else 0,
                   torch.distributed.get_world_size() if dist else 1)

    @property
    def log_dir(self):
        return os.path.join(self.root, "logs", self.doc)

    @property
    def tb_dir(self):
        return os.path.join(self.root, "tensorboard", self.doc)

    @property
    def ckpt_path(self):
        return os.path.join(self.log_dir, "checkpoint.pth")

    def holds_checkpoint(self):
        """Whether the run folder holds checkpoint.pth or a numbered snapshot."""
        return os.path.exists(self.ckpt_path) or (os.path.isdir(self.log_dir)
                                                   and bool(numbered_snapshots(self.log_dir)))

    def shard(self, n):
        """(start, stop) of this rank's share of n items: contiguous, sizes differing by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, x):
        """Concatenate every rank's tensor in rank order (on all ranks); x itself when not distributed."""
        if self.world == 1:
            return x
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, x.cpu())
        return torch.cat(parts)

    def any_rank(self, flags, device):
        """For each of `flags`, True on every rank if it is true on any (one all-reduce for all of them; the flags
        themselves when not distributed)."""
        if self.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def output_paths(folder, names, overwrite):
    """{name: folder/name} for the files a command will write into -o; refuses to replace any without
    --overwrite, and makes the folder."""
    paths = {k: os.path.join(folder, k) for k in names}
    present = [p for p in paths.values() if os.path.exists(p)]
    if present and not overwrite:
        raise NCSNError(f"{', '.join(present)} already exist: choose another -o or pass --overwrite")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise NCSNError(f"cannot create the image folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK):
        raise NCSNError(f"the image folder {folder} is not writable")
    return paths


# ----------------------------------------------------------------------------------------------------------
# Making the run folder; the writer and the signals of training

class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM only set stop.signum; training checks it after
    each step, writes a checkpoint and stops. Outside the main thread signals are left alone, and so they are with
    install=False (a training called from a notebook or a script: Ctrl-C there is the caller's)."""

    def __init__(self, install=True):
        self.signum, self._old, self.install = None, {}, install

    def _handler(self, signum, frame):
        if self.signum is None:
            log.warning("%s received: stopping after this step", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self):
        if not self.install:
            return self
        try:
            self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


LOCK_FILE = ".train.lock"  # in the run folder: the training command that writes the folder holds a lock on it
LOCK_BUSY = (errno.EACCES, errno.EAGAIN)  # what fcntl.lockf raises while another process holds the lock


class RunLock:
    """The run folder's lock, held by rank 0 of a training command from before it reads the folder's checkpoints
    (or, for a new folder, from when it makes it) to its end, so that a second training command of the same run
    is refused with one line instead of writing checkpoints into the same folder. A POSIX record lock on LOCK_FILE
    (fcntl.lockf): the operating system releases it when the process ends, however it ends (a crash or SIGKILL
    leaves no stale lock), and a shared file system with locks (NFS) holds it across machines. Without fcntl
    (Windows) or on a file system without locks nothing is locked, and the log says so."""

    def __init__(self, run):
        self.run, self.file = run, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the lock
            self.file = None

    def take(self):
        """Lock the run folder when it exists, on rank 0, once; an NCSNError naming the holder when another
        process holds the lock."""
        if self.file is not None or self.run.rank != 0 or not os.path.isdir(self.run.log_dir):
            return
        try:
            import fcntl
        except ImportError:
            log.info("no file locks here: a second training command of this run at once would not be refused")
            return
        path = os.path.join(self.run.log_dir, LOCK_FILE)
        try:
            f = open(path, "a+")
        except OSError as e:
            raise NCSNError(f"cannot write the run folder {self.run.log_dir}: {e.strerror}") from e
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "a process"
            f.close()
            if e.errno in LOCK_BUSY:
                raise NCSNError(f"run folder {self.run.log_dir} is in use by another training command ({holder}): "
                                f"wait for it to end, or pick another --doc") from e
            log.info("cannot lock %s (%s): a second training command of this run at once would not be refused",
                     path, e.strerror)
            return
        holder = f"pid {os.getpid()} on {platform.node()}\n"  # named to a command refused while this one holds it
        f.seek(0)
        if f.read() != holder:  # the last holder's line otherwise stays as it is
            f.truncate(0)
            f.write(holder)
            f.flush()
        self.file = f


class NullWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def make_run_folders(run, config, device, early_log, lock, start_step, command=""):
    """Rank 0 makes the run folder, takes its `lock` (RunLock) if it does not hold it yet, writes config.yml and
    logs to stdout.txt (which begins with what `early_log`, a progress.EarlyLog, held of this command, and then
    `command`, the command's settings in one line); returns the TensorBoard writer (one that writes nothing on other
    ranks). A run that starts at step 1 (`start_step` 0) is refused if the folder got a checkpoint while it started
    (another training command of this --doc)."""
    if run.rank != 0:
        return NullWriter()
    from tensorboardX import SummaryWriter  # before anything is written: a missing package leaves no folder
    try:
        for d in (run.log_dir, run.tb_dir):
            os.makedirs(d, exist_ok=True)
        lock.take()
        if start_step == 0 and run.holds_checkpoint():
            raise NCSNError(f"run folder {run.log_dir} got a checkpoint from another training command while this one "
                            f"started: pick another --doc, or pass --resume_training to continue it")
        for f in os.listdir(run.log_dir):  # our own temporary files, left by a crash mid-write
            if ".pth.tmp." in f:
                os.remove(os.path.join(run.log_dir, f))
                log.info("removed %s, a checkpoint write cut off by a crash", f)
        probe = os.path.join(run.log_dir, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        with open(os.path.join(run.log_dir, "config.yml"), "w") as f:
            yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    except OSError as e:
        raise NCSNError(f"cannot write the run folder {run.log_dir}: {e.strerror}") from e
    early_log.attach(os.path.join(run.log_dir, "stdout.txt"))
    log.info("run %s: %s", run.doc, command)
    log.info("device %s%s, torch %s", device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else "", torch.__version__)
    return SummaryWriter(run.tb_dir, filename_suffix=f".{time.time_ns()}")  # unique name per writer


# ----------------------------------------------------------------------------------------------------------
# What sampling commands write

def output_folder(run, image_folder=None, ckpt=None, digit=None, kind="samples"):
    """Where a sampling command writes: `image_folder` (-o) when given, else a folder of the run's own (never the
    repository's images/) named for what is drawn, so that no sampling command writes over another's output:
    samples/ for --sample of the newest checkpoint, samples_digit3/ for --digit 3, samples_ckpt1000/ for
    --ckpt 1000 (samples_ckpt1000_digit3/ for both), and inpaint/ (inpaint_ckpt1000/) for kind "inpaint"."""
    if image_folder is not None:
        return image_folder
    name = kind
    if ckpt is not None:
        name += "_ckpt" + (ckpt if ckpt.isdigit() else os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0])
    if digit is not None:
        name += f"_digit{digit}"
    return os.path.join(run.log_dir, name)


def write_samples(samples, frames, names, to_image, nrow=None):
    """The grid PNG (rows of `nrow` images; default a square), the raw tensor and the GIF of the trajectory
    frames."""
    from PIL import Image
    from torchvision.utils import make_grid

    hint = "free space there or write to another -o"  # each file whole or not there, no temporary one left
    images = to_image(samples).clamp(0, 1)
    atomic_save_image(images, names["samples.png"], hint, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2)
    atomic_torch_save(samples, names["samples.pt"], hint)
    nrow = math.ceil(math.sqrt(len(frames[0])))
    pil = [Image.fromarray(make_grid(f, nrow=nrow, padding=2)[0].mul(255).round().byte().numpy(), mode="L")
           for f in frames]
    gif = io.BytesIO()
    pil[0].save(gif, format="GIF", save_all=True, append_images=pil[1:], duration=[60] * (len(pil) - 1) + [2000],
                loop=0)
    atomic_write_bytes(names["movie.gif"], gif.getvalue(), hint)


def write_snapshot_grid(run, step, images):
    """The snapshot grid of training step `step`: `images` (n, 1, 28, 28) in [0, 1] as one square grid (3, H, W),
    written to <log_dir>/snapshot_grids/step_<step>.png; returns the grid (for TensorBoard)."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=2)  # (3, H, W)
    folder = os.path.join(run.log_dir, "snapshot_grids")
    os.makedirs(folder, exist_ok=True)
    save_image(grid, os.path.join(folder, f"step_{step}.png"))
    return grid
