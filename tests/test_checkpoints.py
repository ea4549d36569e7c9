"""Checkpoints you can trust: where a resumed run's optimizer state lives, fused Adam only where the device has it, and
a full disk said plainly."""
import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch

import checkpoint
import main
from common import Run, numbered_snapshots
from conftest import CPU, REPO, tiny_config, write_config, write_fake_mnist

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


def cli(capsys, tmp_path, *args):
    """main.main(args) with --run tmp_path/run: (exit status, ERROR lines, WARNING lines, stdout, stderr)."""
    capsys.readouterr()
    code = main.main([*CPU, "--run", str(tmp_path / "run"), *map(str, args)])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    return (code, [x for x in lines if x.startswith("ERROR")], [x for x in lines if x.startswith("WARNING")], out,
            err)


# ----------------------------------------------------------------------------------------------------------
# Where the restored state lives: a "meta" device stands in for a GPU (its tensors have a device, no data)

def restored_on_meta(runs, fused_adam, monkeypatch):
    import devices
    import runner

    run = Run(os.path.join(runs[0], "run"), "r")
    ckpt = checkpoint.latest_checkpoint(run)  # as train() reads it for --resume_training
    assert all(t.device.type == "cpu" for s in ckpt["optimizer"]["state"].values() for t in s.values())
    cfg = checkpoint.checkpoint_config(ckpt, run.ckpt_path)
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, fused_adam=fused_adam))
    monkeypatch.setattr(devices, "fused_adam_ok", lambda device: True)
    model = runner.make_model(cfg, torch.device("meta"))
    optimizer = runner.make_optimizer(cfg, model)
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
    assert abs(needed - size) < 1000 and 0 <= free < needed, line
    assert "the snapshots before step 9 are intact" in line and "training.keep_snapshots" in line and "--run" in line
    assert_snapshots_whole(logs, [3, 6])


@pytest.mark.skipif(NAMESPACE is None, reason="no mount namespace for a small file system here")
def test_a_full_disk_under_samples_and_metrics_is_one_line_and_leaves_no_temporary_file(runs, tmp_path):
    mount, copy = tmp_path / "fs", tmp_path / "copy"
    run = os.path.join(runs[0], "run")
    # 8 KiB: samples.png (one page) fits, samples.pt (about 14 KB) does not
    p = in_small_fs(mount, 8192, f"{sys.executable} {REPO}/main.py {' '.join(CPU)} --run {run} --doc r --sample -o "
                                 f"{mount}/out; echo exit=$?; ls -a {mount}/out")
    errors = [x for x in p.stderr.splitlines() if x.startswith("ERROR")]
    assert "exit=1" in p.stdout and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"cannot write {mount}/out/samples.pt: No space left on device (ENOSPC); it needs " in errors[0]
    assert "write to another -o" in errors[0]
    assert sorted(p.stdout.split("exit=1")[1].split()) == [".", "..", "samples.png"]  # whole, and nothing else
    code = (f"import os, sys; sys.path.insert(0, {REPO!r}); import evaluate; from common import Run, NCSNError\n"
            f"run = Run({str(mount)!r}, 'm'); os.makedirs(run.log_dir)\n"
            "with open(os.path.join(run.log_dir, 'filler'), 'wb', buffering=0) as f:\n"
            "    try:\n"
            "        while True: f.write(bytes(4096))\n"
            "    except OSError: pass\n"
            "try: evaluate.record_metrics(run, {'step': 3, 'fid': 1.5})\n"
            "except NCSNError as e: print('ERROR', e)\n"
            "print('files', sorted(os.listdir(run.log_dir)))\n")
    script = tmp_path / "metrics.py"
    script.write_text(code)
    p = in_small_fs(mount, 65536, f"{sys.executable} {script}")
    assert f"ERROR cannot write {mount}/logs/m/metrics.json: No space left on device (ENOSPC); it needs " in p.stdout, \
        p.stdout + p.stderr
    assert "files ['filler']" in p.stdout
