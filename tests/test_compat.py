"""A run written by the code before the runner was split up (commit PRE_SPLIT) still resumes and samples.

The old code itself makes the checkpoint: the test unpacks that commit's tree from git into a temporary
folder and trains a tiny run with its own main.py (a process of its own: its modules have today's names), then
continues and samples it with today's main.py.
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml

import main
from conftest import CPU, REPO, write_config

PRE_SPLIT = "81ed26d837b44a95d25ad0d632ff3f406b136ac5"  # the last commit with the one-class runner


def old_tree(dest):
    """The repository as of PRE_SPLIT, unpacked into `dest` (skips where the checkout has no git history)."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{PRE_SPLIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"commit {PRE_SPLIT[:7]} is not in this checkout's git history")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", REPO, "archive", PRE_SPLIT], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def test_a_checkpoint_of_the_old_runner_resumes_and_samples(tmp_path, fake_mnist, monkeypatch, capsys):
    old = old_tree(tmp_path / "old")
    with open(old / "config.yml") as f:
        cfg = yaml.safe_load(f)  # the old schema's keys only
    cfg["training"].update(batch_size=8, n_iters=4, snapshot_freq=2, test_freq=2, log_freq=2)
    cfg["data"]["root"] = str(fake_mnist)
    cfg["model"].update(ngf=4, num_classes=4, ema=True, ema_rate=0.9)
    cfg["sampling"].update(n_steps_each=2, n_samples=4, batch_size=4, n_frames=4)
    p = subprocess.run([sys.executable, str(old / "main.py"), "--config", write_config(tmp_path / "old.yml", cfg),
                        "--doc", "r"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # that code has no --device: hide GPUs
    assert p.returncode == 0, p.stderr
    before = torch.load(tmp_path / "run" / "logs" / "r" / "checkpoint.pth", weights_only=True)
    assert before["step"] == 4 and "ema_warmup" not in before["config"]["model"]

    cfg["training"]["n_iters"] = 6  # today's code (main.main here), the same settings, two more steps
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main.main([*CPU, "--config", write_config(tmp_path / "new.yml", cfg), "--doc", "r",
                      "--resume_training"]) == 0
    err = capsys.readouterr().err
    assert "resuming at step 5 of 6" in err
    # the old checkpoint trained without EMA warm-up (its legacy value); today's default turns it on, and says so
    assert "resuming with model.ema_warmup changed" in err
    after = torch.load(tmp_path / "run" / "logs" / "r" / "checkpoint.pth", weights_only=True)
    assert after["step"] == 6
    assert any(not torch.equal(after["model"][k], before["model"][k]) for k in before["model"])

    assert main.main([*CPU, "--doc", "r", "--sample", "-o", str(tmp_path / "s")]) == 0
    assert sorted(os.listdir(tmp_path / "s")) == ["movie.gif", "samples.png", "samples.pt"]
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (4, 1, 28, 28)
