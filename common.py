"""What every command of NCSN-MNIST shares: its errors, atomic writes, seeds, snapshot names, TensorBoard's
scalars and metrics.json's records (where a run lives is rundir.py).

Its own module so that runner.py, metrics.py, evaluate.py and the tests can share these without importing
each other (no module here imports one that imports it back).
"""
import errno
import io
import json
import os
import shutil
import struct
import time

import torch


class NCSNError(RuntimeError):
    """An error the user can act on; main.py prints its one-line message and exits 1."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; main.py exits 128 + signum."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------------
# Seeds: every random stream of a run is a function of (--seed, what it is for, an index), made here only.

SEED_PRIME = 1_000_003  # seed * SEED_PRIME + offset keeps the streams of nearby seeds apart
STREAM = {  # what a derived stream is for -> its offset
    "epoch_order": 0,  # + epoch: the order of the training set in that epoch
    "test_batch": 7_919,  # + step: the test batch of the training loop's test loss
    "test_level": 15_485_863,  # + level: --eval's DSM loss at each noise level
    "sampling_rank": 32_452_843,  # + rank: --sample / --eval on ranks > 0
    "training_metrics": 49_979_687,  # + step: the samples scored during training
    "resume_other_device": 67_867_967,  # + step: the training stream after a resume on another device type
    "inpaint": 86_028_121,  # the test digits, masks and noise of --inpaint
    "snapshot_grid": 104_395_301,  # + step: the samples of training.snapshot_grid
}


def derive_seed(seed, stream, index=0):
    """The seed of one named random stream of a run: (seed * SEED_PRIME + STREAM[stream] + index) mod 2^63."""
    return (seed * SEED_PRIME + STREAM[stream] + index) % (2 ** 63)


# ----------------------------------------------------------------------------------------------------------
# Files

def atomic_write(path, write, size, hint=""):
    """Write a file with `write(f)` (f open for binary writing) so that `path` is always either the old or the
    complete new file; nothing else is left behind. A failed write (a full disk, a quota, a read-only or failing
    file system) is a one-line NCSNError naming the file, the errno's meaning, the bytes it needed (`size()`,
    asked only then) and the free bytes, and `hint`, the way out."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            replace_file(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
    except Exception as e:
        error = os_error(e)
        if error is None:
            raise
        raise write_error(path, error, size(), hint) from e
    fsync_folder(os.path.dirname(os.path.abspath(path)))  # the file is complete: nothing after this can undo it


# Windows refuses to replace a file that another process holds open (a --sample or --verify reading checkpoint.pth
# while training writes it): there os.replace is retried this often, REPLACE_WAIT seconds apart. POSIX never refuses.
REPLACE_RETRIES = 10 if os.name == "nt" else 0
REPLACE_WAIT = 0.5


def replace_file(src, dst):
    """os.replace(src, dst), retried on Windows while another process holds `dst` open."""
    for attempt in range(REPLACE_RETRIES + 1):
        try:
            return os.replace(src, dst)
        except PermissionError:
            if attempt == REPLACE_RETRIES:
                raise
            time.sleep(REPLACE_WAIT)


def fsync_folder(folder):
    """Make a rename inside `folder` durable where the platform can (POSIX: fsync of the folder). Where a folder
    cannot be opened or synced (Windows, some network file systems) this is skipped: the file itself was already
    written, synced and renamed, and stays so."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path, hint=""):
    """torch.save(obj) to `path` through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f), lambda: serialized_size(obj), hint)


def atomic_write_bytes(path, data, hint=""):
    """`data` (bytes) to `path` through atomic_write."""
    atomic_write(path, lambda f: f.write(data), lambda: len(data), hint)


def os_error(e):
    """The OSError behind an exception, or None: torch's zip writer turns the OSError of a failed write into a
    RuntimeError ("unexpected pos ...") whose context is that OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def free_bytes(folder):
    """Bytes an unprivileged process may still write on the file system of `folder` (shutil.disk_usage), or None
    where the platform or the file system cannot say."""
    try:
        return shutil.disk_usage(folder).free
    except (OSError, AttributeError):  # AttributeError: a POSIX system without os.statvfs, which disk_usage calls
        return None


def write_error(path, error, needed, hint=""):
    """The one-line NCSNError of a failed write of `needed` bytes to `path`."""
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    meaning = f"{error.strerror or os.strerror(error.errno)} ({code})" if error.errno else str(error)
    free = free_bytes(os.path.dirname(os.path.abspath(path)))
    space = f"it needs {needed:,} bytes, " + (f"{free:,} are free there" if free is not None else "free space unknown")
    return NCSNError(f"cannot write {path}: {meaning}; {space}{f'; {hint}' if hint else ''}")


class _ByteCounter:
    """A write-only sink that only counts bytes: torch.save into it measures a file without writing one."""

    def __init__(self):
        self.n = 0

    def write(self, b):
        n = memoryview(b).nbytes
        self.n += n
        return n

    def flush(self):
        pass


def serialized_size(obj):
    """The bytes torch.save(obj) writes."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.n


def atomic_save_image(images, path, hint="", **kwargs):
    """torchvision's save_image(images, ...) as a PNG through atomic_write (no half-written image on a full
    disk)."""
    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(images, buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue(), hint)


SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX = "checkpoint_", ".pth"


def snapshot_name(step):
    return f"{SNAPSHOT_PREFIX}{step}{SNAPSHOT_SUFFIX}"


def snapshot_step(name):
    """The step of a numbered snapshot file name (checkpoint_<step>.pth), or None for any other name."""
    if not (name.startswith(SNAPSHOT_PREFIX) and name.endswith(SNAPSHOT_SUFFIX)):
        return None
    digits = name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def numbered_snapshots(log_dir):
    """[(step, file name)] of the checkpoint_<step>.pth files in log_dir, oldest first."""
    found = ((snapshot_step(f), f) for f in os.listdir(log_dir))
    return sorted((step, f) for step, f in found if step is not None)


def chosen_checkpoint(run, ckpt=None):
    """The checkpoint file of --ckpt: None -> the run's checkpoint.pth; a step -> its checkpoint_<step>.pth (a
    one-line NCSNError listing the run's snapshots when it has none of that step); anything else a file path."""
    if ckpt is None:
        return run.ckpt_path
    if not ckpt.isdigit():
        if not os.path.isfile(ckpt):
            raise NCSNError(f"--ckpt {ckpt}: no such checkpoint file (give a step of run {run.doc} or a file)")
        return ckpt
    path = os.path.join(run.log_dir, snapshot_name(int(ckpt)))
    if not os.path.isfile(path):
        steps = [str(step) for step, _ in numbered_snapshots(run.log_dir)] if os.path.isdir(run.log_dir) else []
        raise NCSNError(f"--ckpt {ckpt}: run {run.doc} has no {snapshot_name(int(ckpt))}; its snapshots are at steps "
                        f"{', '.join(steps) or '(none)'}" + (f" (e.g. --ckpt {steps[-1]})" if steps else ""))
    return path


def read_scalars(tb_dir):
    """All scalars in the TensorBoard event files of `tb_dir`: {tag: {step: value}} (later files win).

    Each TFRecord carries the masked CRC-32C of its length and of its bytes, checked here: a record cut off at a
    file's end (training stopped while writing, or a run still writing) ends that file, as in TensorBoard; a record
    that does not match its CRC is a one-line NCSNError naming the file and where."""
    from google.protobuf.message import DecodeError
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out = {}
    files = sorted(f for f in os.listdir(tb_dir) if "tfevents" in f) if os.path.isdir(tb_dir) else []
    for name in files:
        path = os.path.join(tb_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,), (n_crc,) = struct.unpack("<Q", data[pos:pos + 8]), struct.unpack("<I", data[pos + 8:pos + 12])
            if masked_crc32c(data[pos:pos + 8]) != n_crc:
                if not any(data[pos:]):
                    break  # an all-zero tail: the blocks of a write that a crash did not finish
                raise damaged_events(path, pos, "its length does not match its CRC")
            if pos + 16 + n > len(data):
                break  # a record cut off at the end
            payload, (crc,) = data[pos + 12:pos + 12 + n], struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
            if masked_crc32c(payload) != crc:
                raise damaged_events(path, pos, "its bytes do not match their CRC")
            try:
                event = event_pb2.Event.FromString(payload)
            except DecodeError as e:
                raise damaged_events(path, pos, "not a TensorBoard event") from e
            pos += 16 + n
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def damaged_events(path, pos, why):
    return NCSNError(f"TensorBoard file {path} is damaged: the record at byte {pos:,}: {why}; move the file out of "
                     f"{os.path.dirname(path)} to read the others")


def read_metrics(path):
    """The records of a run's metrics.json, oldest first: evaluate.py's list of {"step": ..., name: value, ...}, or a
    {name: {step: value}} file turned into such records; [] where there is no file. A file that is not JSON
    (damaged, truncated) or holds neither is a one-line NCSNError naming it; nothing is written."""
    if not os.path.exists(path):
        return []
    way_out = "move it aside (evaluate.py then starts a new one)"
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())  # bytes: a byte that is not UTF-8 is an error too (a ValueError)
    except OSError as e:
        raise NCSNError(f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise NCSNError(f"{path} is damaged or truncated, not JSON ({str(e).splitlines()[0]}); {way_out}") from e
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        data = [{"step": s, name: v} for name, by_step in data.items() for s, v in by_step.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) and is_step(r.get("step")) for r in data):
        raise NCSNError(f"{path} is damaged: not a list of records each with a step; {way_out}")
    return [{**r, "step": int(r["step"])} for r in data]


def is_step(value):
    """A training step as metrics.json holds it: an int >= 0, or its digits (a JSON object's key)."""
    if isinstance(value, str):
        return value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
