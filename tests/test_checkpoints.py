"""Checkpoints you can trust: a flipped bit or a cut-off file is found before anything uses it, resume falls back to
the newest snapshot that verifies, a full disk is said plainly, and --verify lists what is good."""
import copy
import dataclasses
import errno
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile

import pytest
import torch

import checkpoint
import main
import schema
from common import NCSNError, numbered_snapshots
from conftest import CPU, REPO, cli, snapshot_tree, tiny_config, write_config, write_fake_mnist
from rundir import Run

SETTINGS = {"training.snapshot_freq": 3, "fast.fused_adam": False}  # torch's default Adam: `step` on the CPU


def config(tmp, data, n_iters, **more):
    return write_config(os.path.join(tmp, f"c{n_iters}.yml"),
                        tiny_config(data, **{"training.n_iters": n_iters, **SETTINGS, **more}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs trained once: 'r' to step 6 and 'r9' to step 9 (snapshots every 3 steps, checkpoint.pth a hard
    link to the newest), and 'full', the same run unbroken to step 12."""
    tmp = str(tmp_path_factory.mktemp("ckpt_runs"))
    data = write_fake_mnist(os.path.join(tmp, "data"))
    for doc, n in (("r", 6), ("r9", 9), ("full", 12)):
        assert main.main([*CPU, "--config", config(tmp, data, n), "--run", os.path.join(tmp, "run"), "--doc", doc]) == 0
    return tmp, data


def copy_run(runs, doc, tmp_path):
    """A copy of the run `doc` under tmp_path/run, with checkpoint.pth a hard link to the newest snapshot again."""
    src = os.path.join(runs[0], "run", "logs", doc)
    dst = tmp_path / "run" / "logs" / doc
    shutil.copytree(src, dst)
    newest = max(numbered_snapshots(dst))[1]
    os.remove(dst / "checkpoint.pth")
    os.link(dst / newest, dst / "checkpoint.pth")
    return dst


def data_start(blob, info):
    """Where a zip member's bytes begin: after its local header (30 bytes, the name and the extra field)."""
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", blob[off + 26:off + 30])
    return off + 30 + name_len + extra_len


def member_at(path, offset):
    """The zip member (without torch's top folder) whose bytes hold `offset`."""
    blob = open(path, "rb").read()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            start = data_start(blob, info)
            if start <= offset < start + info.compress_size:
                return info.filename.split("/", 1)[1]
    raise AssertionError(f"offset {offset} is in no member")


def flip(path, offset, mask=0x40):
    """XOR one byte of the file in place (a hard-linked checkpoint.pth and its snapshot both change)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def offset_in(path, target):
    """Where the bytes `target` lie in the file: they must occur exactly once."""
    blob = open(path, "rb").read()
    assert blob.count(target) == 1
    return blob.index(target)


def where(path, part):
    """(offset, mask) of a bit that lives in `part` of the checkpoint: a byte in the middle of a weight tensor, of an
    Adam moment, or the lowest bit of the config's model.sigma_end (a float64 in data.pkl: 0.01 would silently
    become 0.010000000000000002)."""
    ckpt = torch.load(path, weights_only=True)
    if part == "weights":
        raw = ckpt["model"]["end_conv.weight"].numpy().tobytes()
        return offset_in(path, raw) + len(raw) // 2, 0x40
    if part == "optimizer":
        raw = ckpt["optimizer"]["state"][0]["exp_avg_sq"].numpy().tobytes()
        return offset_in(path, raw) + len(raw) // 2, 0x40
    blob = open(path, "rb").read()
    pickled = b"G" + struct.pack(">d", ckpt["config"]["model"]["sigma_end"])  # pickle's BINFLOAT
    return blob.index(pickled, blob.index(b"sigma_end")) + 8, 0x01


@pytest.mark.parametrize("part", ["weights", "optimizer", "config"])
def test_a_flipped_bit_is_refused_by_sample_and_skipped_by_resume(runs, tmp_path, capsys, part):
    logs = copy_run(runs, "r", tmp_path)
    offset, mask = where(logs / "checkpoint.pth", part)
    member = member_at(logs / "checkpoint.pth", offset)
    assert member.startswith("data/") if part != "config" else member == "data.pkl"
    flip(logs / "checkpoint.pth", offset, mask)  # checkpoint.pth and checkpoint_6.pth: one file
    before = snapshot_tree(tmp_path / "run")
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "r", "--sample", "-o", tmp_path / "out")
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert f"checkpoint.pth is damaged (CRC mismatch in {member}): the newest intact snapshot is checkpoint_3.pth, " \
           f"use it with --ckpt 3" in errors[0]
    assert not (tmp_path / "out").exists() and snapshot_tree(tmp_path / "run") == before
    # resume skips both names of the damaged file, says so, and trains steps 4..9 as an unbroken run does
    code, errors, warnings, _, err = cli(capsys, tmp_path, "--config", config(tmp_path, runs[1], 9), "--doc", "r",
                                         "--resume_training")
    assert code == 0 and not errors, err
    assert any(f"resuming from step 3 (checkpoint_3.pth): checkpoint.pth is damaged (CRC mismatch in {member}), "
               f"checkpoint_6.pth is damaged (CRC mismatch in {member}) (the same file as checkpoint.pth); "
               f"steps 4 to 6 are trained again" in w for w in warnings), warnings
    assert "resuming at step 4 of 9" in err
    ours, ref = torch.load(logs / "checkpoint.pth", weights_only=True), \
        torch.load(os.path.join(runs[0], "run", "logs", "full", "checkpoint_9.pth"), weights_only=True)
    assert ours["step"] == 9 and all(torch.equal(ours["model"][k], ref["model"][k]) for k in ref["model"])


def assert_equal_runs(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def test_a_truncated_checkpoint_pth_resumes_from_the_intact_snapshot_of_its_step(runs, tmp_path, capsys):
    logs = copy_run(runs, "r", tmp_path)
    blob = (logs / "checkpoint.pth").read_bytes()
    os.remove(logs / "checkpoint.pth")
    (logs / "checkpoint.pth").write_bytes(blob[:20_000])  # cut off; checkpoint_6.pth is whole
    code, errors, warnings, _, err = cli(capsys, tmp_path, "--config", config(tmp_path, runs[1], 12), "--doc", "r",
                                         "--resume_training")
    assert code == 0 and not errors, err
    assert any("resuming from step 6 (checkpoint_6.pth): checkpoint.pth is truncated (no zip directory at its end)"
               in w for w in warnings), warnings
    assert "resuming at step 7 of 12" in err
    assert_equal_runs(torch.load(logs / "checkpoint.pth", weights_only=True),
                      torch.load(os.path.join(runs[0], "run", "logs", "full", "checkpoint.pth"), weights_only=True))


def test_both_newest_files_damaged_resumes_one_snapshot_earlier_and_says_what_is_lost(runs, tmp_path, capsys):
    logs = copy_run(runs, "r9", tmp_path)
    blob = (logs / "checkpoint.pth").read_bytes()
    os.remove(logs / "checkpoint.pth")
    (logs / "checkpoint.pth").write_bytes(blob[:20_000])
    offset, mask = where(logs / "checkpoint_9.pth", "weights")
    flip(logs / "checkpoint_9.pth", offset, mask)
    intact = (logs / "checkpoint_3.pth").read_bytes()
    code, errors, warnings, _, err = cli(capsys, tmp_path, "--config", config(tmp_path, runs[1], 12), "--doc", "r9",
                                         "--resume_training")
    assert code == 0 and not errors, err
    member = member_at(os.path.join(runs[0], "run", "logs", "r9", "checkpoint_9.pth"), offset)
    assert any(f"resuming from step 6 (checkpoint_6.pth): checkpoint.pth is truncated (no zip directory "
               f"at its end), checkpoint_9.pth is damaged (CRC mismatch in {member}); steps 7 "
               f"to 9 are trained again" in w for w in warnings), warnings
    assert "resuming at step 7 of 12" in err and (logs / "checkpoint_3.pth").read_bytes() == intact
    assert_equal_runs(torch.load(logs / "checkpoint.pth", weights_only=True),
                      torch.load(os.path.join(runs[0], "run", "logs", "full", "checkpoint.pth"), weights_only=True))


def test_a_run_without_an_intact_snapshot_is_a_one_line_error_and_nothing_changes(runs, tmp_path, capsys):
    logs = copy_run(runs, "r", tmp_path)
    flip(logs / "checkpoint.pth", where(logs / "checkpoint.pth", "weights")[0])
    flip(logs / "checkpoint_3.pth", where(logs / "checkpoint_3.pth", "optimizer")[0])
    before = snapshot_tree(tmp_path / "run")
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", config(tmp_path, runs[1], 9), "--doc", "r",
                                  "--resume_training")
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert f"no checkpoint in {logs} verifies, nothing to resume from: checkpoint.pth is damaged" in errors[0]
    assert "checkpoint_3.pth is damaged (CRC mismatch in data/" in errors[0] and "another --doc" in errors[0]
    assert snapshot_tree(tmp_path / "run") == before
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "r", "--sample", "-o", tmp_path / "out")
    assert code == 1 and len(errors) == 1 and "no other snapshot in" in errors[0] and "is intact" in errors[0], err


def small_checkpoint(path):
    """A checkpoint dict of make_checkpoint (config, weights, Adam state, RNG states) around a 3-to-2 linear layer,
    saved to `path`: 16 zip members. Its config names a fixed data folder, so its layout (every header's offset)
    is the same wherever the test runs; only the bytes of torch's random serialization id differ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    config = schema.config_from_dict(tiny_config("/data"))
    torch.save(checkpoint.make_checkpoint(config, model, None, optimizer, torch.Generator().manual_seed(0), 1, 1),
               path)
    return open(path, "rb").read()


def zip_structure(blob, path):
    """The offsets of every byte of the archive that is not a member's data: local headers (with names and extra
    fields), the central directory and the end record."""
    inside = bytearray(len(blob))
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            start = data_start(blob, info)
            inside[start:start + info.compress_size] = b"\1" * info.compress_size
    return [p for p in range(len(blob)) if not inside[p]]


@pytest.mark.parametrize("bits", ["one_per_byte", pytest.param("all", marks=pytest.mark.slow)])
def test_every_flip_in_the_zip_structure_is_refused_or_loads_the_same(tmp_path, bits):
    """A flip in a member's bytes fails its CRC; one in the zip's headers must be refused as damaged by the check or
    change nothing that read_checkpoint returns: never a traceback (zlib.error for a member whose method bit turned
    it from stored into deflated, a header torch's reader refuses) and never other tensors. `one_per_byte` flips a
    seeded bit of each of the 2,831 structure bytes (3 s); `all` flips all 8 bits of each (22,648 flips, 30 s)."""
    blob = small_checkpoint(tmp_path / "intact.pth")
    structure = zip_structure(blob, tmp_path / "intact.pth")
    (tmp_path / "again").mkdir()  # torch names the archive's top folder after the file: the same name here
    again = small_checkpoint(tmp_path / "again" / "intact.pth")
    assert len(again) == len(blob) and zip_structure(again, tmp_path / "again" / "intact.pth") == structure
    assert len(structure) > 2000
    ref = torch.load(tmp_path / "intact.pth", weights_only=True)
    rng, path, seen = random.Random(0), tmp_path / "flipped.pth", {"damaged": 0, "truncated": 0, "harmless": 0}
    for offset in structure:
        for bit in range(8) if bits == "all" else [rng.randrange(8)]:
            b = bytearray(blob)
            b[offset] ^= 1 << bit
            path.write_bytes(b)
            try:
                got = checkpoint.read_checkpoint(path)
            except checkpoint.DamagedCheckpoint as e:
                seen[e.problem.split(" ")[0]] += 1
                continue
            assert same(got, ref), f"a flip of bit {bit} at offset {offset} loads other values without a word"
            seen["harmless"] += 1
    assert seen["damaged"] > len(structure) // 4 and seen["harmless"] > len(structure) // 4, seen


def same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_member_turned_deflated_is_damage_for_verify_sample_and_resume(runs, tmp_path, capsys):
    """Bit 3 of a member's compression method in the zip directory turns "stored" into "deflated": inflating its
    bytes raised zlib.error from inside the check, and --verify, --sample and --resume_training ended in a
    traceback. Now the file is damaged, like any other."""
    logs = copy_run(runs, "r9", tmp_path)
    blob = bytearray((logs / "checkpoint.pth").read_bytes())
    blob[blob.index(b"PK\x01\x02") + 10] ^= 0x08  # the first member's method: 0 (stored) -> 8 (deflated)
    os.remove(logs / "checkpoint.pth")  # checkpoint_9.pth stays intact
    (logs / "checkpoint.pth").write_bytes(blob)
    code, errors, _, out, err = cli(capsys, tmp_path, "--doc", "r9", "--verify")
    assert code == 1 and "Traceback" not in err and out.splitlines()[-1].endswith(
        "damaged (in data.pkl: error: Error -3 while decompressing data: invalid stored block lengths)"), out + err
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "r9", "--sample", "-o", tmp_path / "out")
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "checkpoint.pth is damaged (in data.pkl" in errors[0] and "use it with --ckpt 9" in errors[0]
    code, errors, warnings, _, err = cli(capsys, tmp_path, "--doc", "r9", "--resume_training",
                                         "--set", "training.n_iters=10")
    assert code == 0 and not errors and "Traceback" not in err, err
    assert any("resuming from step 9 (checkpoint_9.pth): checkpoint.pth is damaged (in data.pkl" in w
               for w in warnings), warnings


def test_verify_lists_every_snapshot_and_names_the_newest_intact(runs, tmp_path, capsys):
    logs = copy_run(runs, "r9", tmp_path)
    code, errors, _, out, err = cli(capsys, tmp_path, "--doc", "r9", "--verify")
    assert code == 0 and not errors and "all 4 checkpoint files" in err, err
    size = os.path.getsize(logs / "checkpoint_9.pth")
    assert out.splitlines()[-1].split() == ["checkpoint.pth", "step", "9", f"{size:,}", "bytes", "ok", "(the", "same",
                                            "file", "as", "checkpoint_9.pth)"]
    flip(logs / "checkpoint.pth", where(logs / "checkpoint.pth", "config")[0], 0x01)
    blob = (logs / "checkpoint_6.pth").read_bytes()
    os.remove(logs / "checkpoint_6.pth")
    (logs / "checkpoint_6.pth").write_bytes(blob[:20_000])
    code, errors, _, out, err = cli(capsys, tmp_path, "--doc", "r9", "--verify")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 4 and len(errors) == 1, err
    assert [x.split()[0] for x in lines] == ["checkpoint_3.pth", "checkpoint_6.pth", "checkpoint_9.pth",
                                             "checkpoint.pth"]
    assert lines[0].endswith("bytes  ok") and " step       3 " in lines[0]
    assert lines[1].endswith("20,000 bytes  truncated (no zip directory at its end)")
    assert lines[2].endswith("damaged (CRC mismatch in data.pkl)")
    assert lines[3].endswith("damaged (CRC mismatch in data.pkl) (the same file as checkpoint_9.pth)")
    assert "3 of 4 checkpoint files" in errors[0] and \
        "the newest intact snapshot is checkpoint_3.pth, use it with --ckpt 3" in errors[0]


# ----------------------------------------------------------------------------------------------------------
# Where the restored state lives: a "meta" device stands in for a GPU (its tensors have a device, no data)

def restored_on_meta(runs, fused_adam, monkeypatch):
    import build
    import devices

    run = Run(os.path.join(runs[0], "run"), "r")
    ckpt = checkpoint.latest_checkpoint(run)  # as train() reads it for --resume_training
    assert all(t.device.type == "cpu" for s in ckpt["optimizer"]["state"].values() for t in s.values())
    cfg = checkpoint.checkpoint_config(ckpt, run.ckpt_path)
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, fused_adam=fused_adam))
    monkeypatch.setattr(devices, "fused_adam_ok", lambda device: True)
    model = build.make_model(cfg, torch.device("meta"))
    optimizer = build.make_optimizer(cfg, model)
    with warnings.catch_warnings():  # "copying from a non-meta parameter ... is a no-op": meta tensors hold no data
        warnings.filterwarnings("ignore", ".*copying from a non-meta parameter")
        assert checkpoint.restore(ckpt, model, None, optimizer, torch.Generator(), cfg, run.ckpt_path) == 6
    return model, optimizer


def test_restore_moves_the_adam_moments_and_keeps_default_adams_step_on_the_cpu(runs, monkeypatch):
    model, optimizer = restored_on_meta(runs, False, monkeypatch)
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"  # where torch keeps it for its default (for-each) Adam


def test_restore_for_fused_adam_puts_step_beside_the_parameters(runs, monkeypatch):
    model, optimizer = restored_on_meta(runs, True, monkeypatch)
    assert optimizer.param_groups[0]["fused"] is True
    assert all(optimizer.state[p]["step"].device.type == "meta" for p in model.parameters())


def test_resume_asks_for_fused_adam_only_where_the_device_has_it(runs, tmp_path, capsys, monkeypatch):
    import devices

    copy_run(runs, "r", tmp_path)
    asked = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        asked.append(self.param_groups[0]["fused"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(devices, "fused_adam_ok", lambda device: False)  # a device without fused Adam
    fused = config(tmp_path, runs[1], 8, **{"fast.fused_adam": True})
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", fused, "--doc", "r", "--resume_training")
    assert code == 0 and "resuming at step 7 of 8" in err, err
    assert asked == [None, None]  # torch's default Adam in both resumed steps, as a fresh run would use


# ----------------------------------------------------------------------------------------------------------
# A full disk: a real small file system (tmpfs in a mount namespace of its own) where one can be made

def namespace_command():
    """The unshare command that gives a process a private mount namespace where it may mount a tmpfs, or None."""
    if shutil.which("unshare") is None:
        return None
    folder = tempfile.mkdtemp()
    try:
        for cmd in (["unshare", "-m"], ["unshare", "-r", "-m"]):
            probe = subprocess.run([*cmd, "sh", "-c", f"mount -t tmpfs -o size=64k ncsn_probe {folder}"],
                                   capture_output=True)
            if probe.returncode == 0:
                return cmd
        return None
    finally:
        os.rmdir(folder)


NAMESPACE = namespace_command()


def in_small_fs(mount, size, script):
    """Run the shell `script` with a fresh tmpfs of `size` bytes mounted at `mount`, seen by this script only."""
    os.makedirs(mount, exist_ok=True)
    return subprocess.run([*NAMESPACE, "sh", "-c", f"mount -t tmpfs -o size={size} ncsn_test {mount} && {script}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_snapshots_whole(logs, steps):
    names = sorted(os.listdir(logs))
    assert not [n for n in names if ".tmp." in n], names
    assert [n for n in names if n.endswith(".pth")] == sorted(["checkpoint.pth",
                                                               *(f"checkpoint_{s}.pth" for s in steps)])
    for s in steps:
        assert checkpoint.damage(os.path.join(logs, f"checkpoint_{s}.pth")) is None
        assert checkpoint.load_checkpoint(os.path.join(logs, f"checkpoint_{s}.pth"))["step"] == s
    assert checkpoint.load_checkpoint(os.path.join(logs, "checkpoint.pth"))["step"] == steps[-1]


def test_a_full_disk_ends_training_with_one_line_and_the_earlier_snapshots_stay(runs, tmp_path, capsys, monkeypatch):
    size = os.path.getsize(os.path.join(runs[0], "run", "logs", "r", "checkpoint_3.pth"))
    cfg = config(tmp_path, runs[1], 12)
    if NAMESPACE is not None:  # room for two snapshots and the logs, not for a third
        mount, copy = tmp_path / "fs", tmp_path / "copy"
        fs = 2 * size + 256 * 1024
        p = in_small_fs(mount, fs, f"{sys.executable} {REPO}/main.py {' '.join(CPU)} --config {cfg} --run {mount}/run "
                                   f"--doc e; echo exit=$?; cp -a {mount}/run {copy}")
        code, err = int(p.stdout.split("exit=")[1].split()[0]), p.stderr
        logs, where_ = copy / "logs" / "e", f"{mount}/run/logs/e"
    else:  # no mount namespace here: the third snapshot's write fails as a full disk's would
        import common

        real_open = open

        class FullDisk:
            def __init__(self, f):
                self.f = f

            def write(self, b):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def opener(path, *args, **kwargs):
            f = real_open(path, *args, **kwargs)
            return FullDisk(f) if "checkpoint_9.pth.tmp." in str(path) else f

        monkeypatch.setattr(common, "open", opener, raising=False)
        code, _, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", "e")
        logs, where_ = tmp_path / "run" / "logs" / "e", str(tmp_path / "run" / "logs" / "e")
    errors = [x for x in err.splitlines() if x.startswith("ERROR")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert f"cannot write {where_}/checkpoint_9.pth: No space left on device (ENOSPC); it needs " in line, line
    needed = int(line.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    free = int(line.split("bytes, ")[1].split(" are free there")[0].replace(",", ""))
    assert abs(needed - size) < 1000, line
    if NAMESPACE is not None:
        assert 0 <= free < needed, line
    else:  # the disk is not full: the free bytes are the file system's (other jobs may write meanwhile)
        st = os.statvfs(logs)
        assert abs(free - st.f_bavail * st.f_frsize) < 2 ** 26, line
    assert "the snapshots before step 9 are intact" in line and "training.keep_snapshots" in line and "--run" in line
    assert_snapshots_whole(logs, [3, 6])


@pytest.mark.skipif(NAMESPACE is None, reason="no mount namespace for a small file system here")
def test_a_full_disk_under_samples_and_metrics_is_one_line_and_leaves_no_temporary_file(runs, tmp_path):
    """--sample -o on an 8 KiB file system: samples.png (one page) fits, samples.pt (about 14 KB) does not; then
    metrics.json on a full one. Both in one process, one interpreter start (main.main, then
    evaluate.record_metrics), each file system of its own."""
    small, full = tmp_path / "fs", tmp_path / "fs_full"
    os.makedirs(full)
    sample = [*CPU, "--run", os.path.join(runs[0], "run"), "--doc", "r", "--sample", "-o", f"{small}/out"]
    code = (f"import os, sys; sys.path.insert(0, {REPO!r}); import evaluate, main; from common import NCSNError\n"
            "from rundir import Run\n"
            f"print('exit', main.main({sample!r}), flush=True)\n"
            f"print('out', sorted(os.listdir({str(small / 'out')!r})))\n"
            f"run = Run({str(full)!r}, 'm'); os.makedirs(run.log_dir)\n"
            "with open(os.path.join(run.log_dir, 'filler'), 'wb', buffering=0) as f:\n"
            "    try:\n"
            "        while True: f.write(bytes(4096))\n"
            "    except OSError: pass\n"
            "try: evaluate.record_metrics(run, {'step': 3, 'fid': 1.5})\n"
            "except NCSNError as e: print('ERROR', e)\n"
            "print('files', sorted(os.listdir(run.log_dir)))\n")
    script = tmp_path / "full_disks.py"
    script.write_text(code)
    p = in_small_fs(small, 8192, f"mount -t tmpfs -o size=65536 ncsn_test_full {full} && {sys.executable} {script}")
    errors = [x for x in p.stderr.splitlines() if x.startswith("ERROR")]
    assert "exit 1" in p.stdout and len(errors) == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert f"cannot write {small}/out/samples.pt: No space left on device (ENOSPC); it needs " in errors[0]
    assert "write to another -o" in errors[0]
    assert "out ['samples.png']" in p.stdout  # whole, and nothing else
    assert f"ERROR cannot write {full}/logs/m/metrics.json: No space left on device (ENOSPC); it needs " in p.stdout, \
        p.stdout + p.stderr
    assert "files ['filler']" in p.stdout


def test_import_authors_refuses_a_damaged_checkpoint(tmp_path, capsys):
    fixture = os.path.join(REPO, "tests", "fixtures", "authors_ncsn_ngf4", "run", "logs", "mnist_ngf4")
    theirs = tmp_path / "theirs"
    shutil.copytree(fixture, theirs)
    raw = torch.load(theirs / "checkpoint.pth", weights_only=True)[0]["module.begin_conv.weight"].numpy().tobytes()
    offset = offset_in(theirs / "checkpoint.pth", raw) + 5
    flip(theirs / "checkpoint.pth", offset)
    code, errors, _, _, err = cli(capsys, tmp_path, "--import_authors", theirs, "--doc", "a")
    assert code == 1 and len(errors) == 1, err
    assert f"checkpoint.pth is damaged (CRC mismatch in {member_at(theirs / 'checkpoint.pth', offset)}): unpack or " \
           f"download the authors' checkpoint again" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_that_is_not_a_zip_archive_is_not_ours(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": 1}, path, _use_new_zipfile_serialization=False)  # torch's format before 1.6
    with pytest.raises(NCSNError, match=r"is not a checkpoint of this code \(not a zip archive\)"):
        checkpoint.load_checkpoint(path)


def test_a_member_marked_a_folder_is_damage(runs, tmp_path):
    """torch's reader loads a zip member whose directory entry carries the DOS folder bit as empty bytes (an Adam step
    counter came back 0 where it was 3): a flip of that one bit is damage, found by the check."""
    src = os.path.join(runs[0], "run", "logs", "r", "checkpoint_3.pth")
    blob = bytearray(open(src, "rb").read())
    with zipfile.ZipFile(src) as z:
        info = z.infolist()[-3]  # a tensor's member
    central = blob.index(b"PK\x01\x02")  # the directory entries: find the one that points at its local header
    while struct.unpack("<I", blob[central + 42:central + 46])[0] != info.header_offset:
        central = blob.index(b"PK\x01\x02", central + 4)
    blob[central + 38] |= 0x10  # external attributes: the folder bit
    path = tmp_path / "marked.pth"
    path.write_bytes(bytes(blob))
    member = info.filename.split("/", 1)[1]
    assert checkpoint.damage(path) == f"damaged (the zip directory marks {member} a folder)"
    with pytest.raises(checkpoint.DamagedCheckpoint, match="a folder"):
        checkpoint.read_checkpoint(path)


@pytest.mark.parametrize("fused", [True, False])
def test_a_resume_on_another_layout_updates_every_weight_with_its_own_moments(tmp_path, fused):
    """A checkpoint trained in NCHW resumed with channels_last (fast.auto may choose it on another machine) and the
    other way round: after restore the optimizer's moments have their parameters' strides, and one Adam step with
    the same gradients moves every weight exactly as a resume on the checkpoint's own layout does. (Fused Adam on the
    CPU reads a parameter and its moments as flat arrays: with NCHW moments under channels_last weights it paired
    each weight with another's moments.)"""
    from build import make_model, make_optimizer
    from checkpoint import make_checkpoint, restore

    def config(channels_last):
        return schema.config_from_dict(tiny_config(tmp_path, **{"fast.channels_last": channels_last,
                                                                "fast.fused_adam": fused}))

    def two_steps(model, optimizer, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # as autograd: p's strides
            optimizer.step()

    for saved_cl in (False, True):
        torch.manual_seed(0)
        cfg = config(saved_cl)
        model = make_model(cfg, "cpu")
        optimizer = make_optimizer(cfg, model)
        two_steps(model, optimizer, 1)
        ckpt = make_checkpoint(cfg, model, None, optimizer, torch.Generator(), 2, 1234)  # live tensors: copied below
        after = {}
        for resumed_cl in (saved_cl, not saved_cl):
            cfg2 = config(resumed_cl)
            model2 = make_model(cfg2, "cpu")
            optimizer2 = make_optimizer(cfg2, model2)
            step = restore(copy.deepcopy(ckpt), model2, None, optimizer2, torch.Generator(), cfg2, "checkpoint.pth")
            assert step == 2
            for p in model2.parameters():
                for key, value in optimizer2.state[p].items():
                    assert key == "step" or value.stride() == p.stride(), (key, value.stride(), p.stride())
            two_steps(model2, optimizer2, 2)
            after[resumed_cl] = {k: v.contiguous() for k, v in model2.state_dict().items()}
        for k, v in after[saved_cl].items():
            assert torch.equal(v, after[not saved_cl][k]), k
