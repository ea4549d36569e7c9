"""ncsn.py, the method from Python: the README's python block runs as written against a tiny run, samples are the
command line's, training installs no signal handler and leaves no log handler behind."""
import logging
import math
import os
import re
import shutil
import signal

import pytest
import torch

import main
import ncsn
from common import NCSNError
from conftest import CPU, TINY_DOC, copy_tiny_run
from test_docs import readme


def python_block():
    """The one ```python block of the README."""
    (block,) = re.findall(r"```python\n(.*?)```", readme(), re.S)
    return block


def tiny_run_as(tmp_path, tiny_run, doc):
    """A copy of the session's tiny run as <tmp_path>/run/logs/<doc>, on a copy of its data (scoring caches the
    metrics classifier beside the data); returns its run root."""
    root = tmp_path / "run"
    data = copy_tiny_run(tiny_run, str(root))
    for part in ("logs", "tensorboard"):
        os.rename(root / part / TINY_DOC, root / part / doc)
    shutil.copytree(data, tmp_path / "data")
    config = root / "logs" / doc / "config.yml"
    config.write_text(config.read_text().replace(data, str(tmp_path / "data")))
    return root


def test_the_readme_python_block_runs_as_written(tmp_path, tiny_run, monkeypatch):
    """After the README's quick commands (here: the tiny run as run/logs/quick in the working folder), its python
    block runs as it stands: a tensor of the asked shape in [0, 1], scores with every key it names, and the run
    trained further by the steps it asks."""
    block = python_block()
    tiny_run_as(tmp_path, tiny_run, "quick")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    (n,) = map(int, re.findall(r"run\.sample\((\d+)\)\s+#", block))  # the first sample, x
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    keys = re.findall(r'scores\["(\w+)"\]', block)
    assert set(keys) == {"fid", "kid", "kid_se", "inception_score", "mean_confidence"}
    scores = namespace["scores"]
    assert all(isinstance(scores[k], float) and math.isfinite(scores[k]) for k in keys), scores
    assert scores["n_images"] == 100 and scores["kid_se"] > 0
    (steps,) = map(int, re.findall(r"steps=(\d+)", block))
    assert torch.load(tmp_path / "run" / "logs" / "quick" / "checkpoint.pth", weights_only=True)["step"] == 6 + steps


def test_sample_draws_what_the_sample_command_draws(tmp_path, tiny_run):
    """open_run(...).sample(n) with n = sampling.n_samples and the default seed: --sample's samples, in [0, 1]; another
    seed, sampler or digit draws others, of the asked shape."""
    root = tiny_run_as(tmp_path, tiny_run, "s")
    assert main.main([*CPU, "--run", str(root), "--doc", "s", "--sample", "-o", str(tmp_path / "out")]) == 0
    written = torch.load(tmp_path / "out" / "samples.pt", weights_only=True)  # (4, 1, 28, 28), raw
    run = ncsn.open_run("s", root=str(root), device="cpu")
    assert run.step == 6
    x = run.sample(4)
    assert torch.equal(x, written.clamp(0, 1))
    other = run.sample(4, seed=5)
    assert other.shape == (4, 1, 28, 28) and not torch.equal(other, x)
    cas = run.sample(3, sampler="consistent", steps=2, step_lr=6e-5)  # one step a level over 7 levels
    assert cas.shape == (3, 1, 28, 28) and 0 <= cas.min() and cas.max() <= 1
    threes = run.sample(4, digit=3)  # guided by the noise-conditional classifier (trained here on the fake data)
    assert threes.shape == (4, 1, 28, 28) and not torch.equal(threes, x)
    with pytest.raises(NCSNError, match="step_lr .* is outside what consistent sampling"):
        run.sample(3, sampler="consistent", steps=2)


def test_train_installs_no_signal_handler_and_keeps_the_run_log_to_itself(tmp_path, tiny_run, monkeypatch):
    """ncsn.train continues a run by the steps asked with SIGINT left as it is (the command line's training takes it
    over: tests/test_user_path.py), and removes the run's log file from the logger when it returns."""
    import bookkeeping
    root = tiny_run_as(tmp_path, tiny_run, "t")
    seen, save = [], bookkeeping.save_checkpoint

    def save_and_look(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGINT))
        return save(*args, **kwargs)

    monkeypatch.setattr(bookkeeping, "save_checkpoint", save_and_look)
    before = signal.getsignal(signal.SIGINT)
    handlers = list(logging.getLogger("ncsn").handlers)
    assert ncsn.train("t", 3, root=str(root), device="cpu") == 9
    assert seen and all(h is before for h in seen)
    assert logging.getLogger("ncsn").handlers == handlers
    assert "resuming at step 7 of 9" in (root / "logs" / "t" / "stdout.txt").read_text()
    assert ncsn.train("new", 2, config=str(root / "logs" / "t" / "config.yml"), root=str(root), device="cpu") == 2


def test_bad_calls_are_one_line_errors(tmp_path):
    with pytest.raises(NCSNError, match="no run at .*: train it first"):
        ncsn.open_run("nothing", root=str(tmp_path / "run"))
    with pytest.raises(NCSNError, match="steps must be a whole number >= 1, got 0"):
        ncsn.train("nothing", 0, root=str(tmp_path / "run"))
