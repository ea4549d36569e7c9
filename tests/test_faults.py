"""Never lose a run: SIGKILL at random moments (also inside checkpoint writes), SIGTERM/SIGINT, NaN losses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import runner
from common import numbered_snapshots, snapshot_step
from conftest import CPU, REPO, tiny_config, write_config

DRIVER = os.path.join(REPO, "tests", "kill_driver.py")


class Child:
    """One main.py command in a child of the fork server: its pid, its exit status once it has ended."""

    def __init__(self, server, pid, out):
        self.server, self.pid, self.out, self.returncode = server, pid, out, None

    def poll(self):
        if self.returncode is None and os.path.exists(self.out + ".exit"):
            self.wait()
        return self.returncode

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=600):
        """The exit status (negative: killed by that signal), once the child has ended."""
        if self.returncode is None:
            t0 = time.time()
            while not os.path.exists(self.out + ".exit"):
                assert time.time() - t0 < timeout, f"child {self.pid} still running after {timeout} s"
                time.sleep(0.01)
            reply = json.loads(self.server.stdout.readline())
            assert reply["pid"] == self.pid, reply
            self.returncode = reply["status"]
        return self.returncode

    def communicate(self, timeout=600):
        """Waits for the end; returns its stdout and stderr, interleaved, as Popen.communicate()[0] would."""
        self.wait(timeout)
        with open(self.out) as f:
            return f.read()


class ForkServer:
    """tests/kill_driver.py: main.py commands in child processes, one at a time, with slowed checkpoint writes."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "NCSN_SLOW_SAVE": "0.1"})

    def start(self, out, *argv):
        """`python main.py --device cpu ARGV` in a child, its output into the file `out`."""
        self.proc.stdin.write(json.dumps({"argv": [*CPU, *map(str, argv)], "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server has ended"
        return Child(self.proc, json.loads(line)["pid"], str(out))

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def children():
    """One fork server for the module's runs: torch is imported once, not once a run."""
    server = ForkServer()
    yield server
    server.close()


def snapshots(log_dir):
    """{file name: step} of every checkpoint file; each must load whole (weights_only) and hold its step."""
    out = {}
    for f in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        if f.startswith("checkpoint") and f.endswith(".pth"):
            c = torch.load(os.path.join(log_dir, f), weights_only=True)  # raises if half-written
            assert set(c) >= {"model", "optimizer", "step", "rng", "config"}
            if f != "checkpoint.pth":
                assert c["step"] == snapshot_step(f)
            out[f] = c["step"]
    return out


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate() or proc.poll() is not None:
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


def final_params(log_dir):
    return torch.load(os.path.join(log_dir, "checkpoint.pth"), weights_only=True)


def train_here(cfg_path, run_dir, doc, *extra):
    """The same command in this process (one torch thread, as the children): for runs nothing interrupts."""
    assert main.main([*CPU, "--config", cfg_path, "--run", run_dir, "--doc", doc, *extra]) == 0


def run_with_kills(children, tmp_path, data, n_kills, seed):
    """Kill a run n_kills times (SIGKILL) at random moments, each after the process has made progress: inside its
    first or second checkpoint write, or in its training loop after it has written a snapshot; resume each time.
    Returns (kills, kills inside a write, resumes, resumes from a snapshot)."""
    n_iters = 18 + 4 * n_kills  # room for every kill: each lets the run advance by one or two snapshots
    cfg = write_config(tmp_path / "c.yml", tiny_config(data, **{"training.n_iters": n_iters,
                                                                "training.snapshot_freq": 3,
                                                                "training.test_freq": 5}))
    run_dir = str(tmp_path / "run")
    # the reference: the same run, never interrupted
    train_here(cfg, run_dir, "ref")
    reference = final_params(os.path.join(run_dir, "logs", "ref"))

    log_dir = os.path.join(run_dir, "logs", "k")
    rng = random.Random(seed)
    kills, mid_write, resumes, from_snapshot = 0, 0, 0, 0

    def own_tmp(pid):  # a checkpoint of this process being written right now
        return os.path.isdir(log_dir) and any(f.endswith(f".tmp.{pid}") for f in os.listdir(log_dir))

    def newest():  # the step of the newest whole snapshot (they appear by rename, whole)
        return max((s for s, _ in numbered_snapshots(log_dir)), default=0) if os.path.isdir(log_dir) else 0

    while True:
        before = snapshots(log_dir)
        first = not os.path.isdir(log_dir)
        proc = children.start(tmp_path / f"child_{kills}_{resumes}.txt", "--config", cfg, "--run", run_dir, "--doc",
                              "k", *([] if first else ["--resume_training"]))
        if kills < n_kills:
            if rng.random() < 0.5:  # inside this process's first or second checkpoint write
                for k in range(rng.randint(1, 2)):
                    if k:
                        wait_for(lambda: not own_tmp(proc.pid), proc)
                    wait_for(lambda: own_tmp(proc.pid), proc)
                time.sleep(rng.uniform(0, 0.08))  # within NCSN_SLOW_SAVE's 0.1 s after the bytes
            else:  # inside the training loop, a random moment after this process's first snapshot
                start = max(before.values(), default=0)
                wait_for(lambda: newest() > start, proc)
                time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                writing = own_tmp(proc.pid)
                proc.kill()
                kills += 1
                mid_write += writing
        out = proc.communicate(timeout=600)
        if not first and ("resuming at step" in out or "starting at step 1" in out):
            # (a) a resume starts right after the newest complete snapshot on disk (or at 1 if none yet)
            expected = max(before.values(), default=0)
            marker = f"resuming at step {expected + 1} " if expected else "starting at step 1"
            assert marker in out, (marker, out)
            resumes += 1
            from_snapshot += expected > 0
        # (b) whatever the moment of the kill, every checkpoint file on disk is whole
        snapshots(log_dir)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, out
    # (c) the end is bitwise the end of the unbroken run
    final = final_params(log_dir)
    assert final["step"] == n_iters
    for k, v in reference["model"].items():
        assert torch.equal(v, final["model"][k]), k
    return kills, mid_write, resumes, from_snapshot


def test_sigkill_at_random_moments_quick(children, tmp_path, fake_mnist):
    kills, mid_write, resumes, from_snapshot = run_with_kills(children, tmp_path, fake_mnist, n_kills=3, seed=0)
    assert kills == 3 and resumes >= 3 and from_snapshot >= 2  # (only the first process may die before any)


@pytest.mark.slow
def test_sigkill_at_random_moments_full(children, tmp_path, fake_mnist):
    kills, mid_write, resumes, from_snapshot = run_with_kills(children, tmp_path, fake_mnist, n_kills=12, seed=1)
    print(f"survived {kills} kills ({mid_write} inside a checkpoint write), {resumes} resumes ({from_snapshot} "
          f"from a snapshot)")
    assert kills >= 10 and mid_write >= 3 and resumes >= kills and from_snapshot >= kills - 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_write_a_checkpoint_and_resume_continues(children, tmp_path, fake_mnist, capsys, sig):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 400,
                                                                       "training.snapshot_freq": 1000}))
    run_dir = str(tmp_path / "run")
    log_dir = os.path.join(run_dir, "logs", "s")
    proc = children.start(tmp_path / "child.txt", "--config", cfg, "--run", run_dir, "--doc", "s")

    def training():  # the handlers are in place from the run folder on, before this line
        path = os.path.join(log_dir, "stdout.txt")
        return os.path.exists(path) and "training at step 1 " in open(path).read()

    wait_for(training, proc)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    step = torch.load(os.path.join(log_dir, "checkpoint.pth"), weights_only=True)["step"]
    assert 0 < step < 400
    assert f"{signal.Signals(sig).name} at step {step}: checkpoint written, continue with: python main.py" in out
    assert "Traceback" not in out
    # resuming continues at the next step and ends where an unbroken run ends
    short = write_config(tmp_path / "c2.yml", tiny_config(fake_mnist, **{"training.n_iters": step + 3,
                                                                         "training.snapshot_freq": 1000}))
    capsys.readouterr()
    train_here(short, run_dir, "s", "--resume_training")
    assert f"resuming at step {step + 1} " in capsys.readouterr().err
    train_here(short, run_dir, "ref")
    a, b = final_params(log_dir), final_params(os.path.join(run_dir, "logs", "ref"))
    assert a["step"] == b["step"] == step + 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_nan_loss_stops_with_step_and_level_and_keeps_the_last_good_checkpoint(tmp_path, fake_mnist, monkeypatch,
                                                                                capsys):
    real = runner.dsm_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, labels = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:  # training step 5: one sample's loss becomes NaN
                loss = loss.clone()
                loss[3] = float("nan")
        return loss, labels

    monkeypatch.setattr(runner, "dsm_loss", poisoned)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 10,
                                                                      "training.snapshot_freq": 4,
                                                                      "training.log_freq": 3}))
    log_dir = tmp_path / "run" / "logs" / "n"
    capsys.readouterr()
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "n"]) == 1
    err = capsys.readouterr().err
    c = torch.load(log_dir / "checkpoint.pth", weights_only=True)
    assert "non-finite loss at step 5 at noise level(s) " in err and "the last good checkpoint is kept" in err
    assert c["step"] == 4 and all(torch.isfinite(v).all() for v in c["model"].values())
    assert sorted(os.listdir(log_dir)) == [".train.lock", "checkpoint.pth", "checkpoint_4.pth", "config.yml",
                                           "stdout.txt"]
