"""torchrun with 2 gloo processes on the CPU: the same parameters as one process with the same global batch,
and resume across process counts (2 -> 1 and 1 -> 2).

Each torchrun launch costs seconds of start-up (torchrun and both workers import torch): the one-process side of
every comparison runs main.main in this process, and one launch serves two features where they can share it
(stratified levels and metrics during training)."""
import os
import subprocess
import sys

import pytest
import torch

import main
from common import read_scalars
from conftest import CPU, REPO, tiny_config, write_config

pytestmark = pytest.mark.slow  # 5 torchrun launches

PLAIN = {"fast.bf16": False, "fast.fused_adam": False}  # fp32: the comparison is up to summation order only


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")  # the venv's own torchrun


def torchrun(*args, cwd):
    """The README's form: `torchrun --standalone --nproc_per_node=2 -- main.py --run RUN ...` (without the `--`,
    torchrun reads main.py's --run as an ambiguous abbreviation of its own --run-path)."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--", os.path.join(REPO, "main.py"), *CPU, "--run",
           str(cwd / "run"), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def one_process(*args, cwd):
    """The same command in one process: main.main here, as `python main.py` runs it."""
    assert main.main([*CPU, "--run", str(cwd / "run"), *map(str, args)]) == 0


def params(tmp_path, doc):
    return torch.load(tmp_path / "run" / "logs" / doc / "checkpoint.pth", weights_only=True)


def assert_close_params(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Fake MNIST, the configs c4 and c8 (4 and 8 steps of batch 10), and the one-process reference run 'one' of
    c8."""
    from conftest import write_fake_mnist
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_fake_mnist(str(tmp / "data"), n_train=60, n_test=16)
    # batch 10 over 60 images: 6 steps an epoch; 8 steps cross an epoch boundary
    c4 = write_config(tmp / "c4.yml", tiny_config(data, **{"training.batch_size": 10, "training.n_iters": 4,
                                                           "training.snapshot_freq": 4}, **PLAIN))
    c8 = write_config(tmp / "c8.yml", tiny_config(data, **{"training.batch_size": 10, "training.n_iters": 8,
                                                           "training.snapshot_freq": 4}, **PLAIN))
    one_process("--config", c8, "--doc", "one", cwd=tmp)
    return tmp, c4, c8


def test_two_processes_match_one(runs):
    tmp, c4, c8 = runs
    p = torchrun("--config", c8, "--doc", "two", cwd=tmp)
    assert "over 2 ranks" in p.stderr
    one, two = params(tmp, "one"), params(tmp, "two")
    assert_close_params(one, two)
    # Adam's step ignores a constant factor on the gradient, so the parameters alone would not see a wrong
    # scale: the first moment (a running mean of the gradient) does, and the logged loss sees a wrong sum
    for (k, a), b in zip(one["optimizer"]["state"].items(), two["optimizer"]["state"].values()):
        err = ((a["exp_avg"] - b["exp_avg"]).norm() / a["exp_avg"].norm()).item()
        assert err < 1e-3, f"exp_avg of parameter {k}: 2 processes differ from 1 by {err:.3g} of its norm"
    loss_one = read_scalars(tmp / "run" / "tensorboard" / "one")["train_loss/raw"]
    loss_two = read_scalars(tmp / "run" / "tensorboard" / "two")["train_loss/raw"]
    assert sorted(loss_one) == sorted(loss_two) == list(range(1, 9))
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], rel=1e-4), f"step {step}: {loss_two[step]} " \
            f"with 2 processes, {loss_one[step]} with 1"
    # only rank 0 wrote: one log, one TensorBoard file
    assert len(os.listdir(tmp / "run" / "tensorboard" / "two")) == 1
    assert (tmp / "run" / "logs" / "two" / "stdout.txt").read_text().count("training at step 1 ") == 1


def test_resume_across_process_counts(runs):
    tmp, c4, c8 = runs
    reference = params(tmp, "one")
    torchrun("--config", c4, "--doc", "two_to_one", cwd=tmp)
    one_process("--config", c8, "--doc", "two_to_one", "--resume_training", cwd=tmp)
    assert_close_params(params(tmp, "two_to_one"), reference)
    one_process("--config", c4, "--doc", "one_to_two", cwd=tmp)
    p = torchrun("--config", c8, "--doc", "one_to_two", "--resume_training", cwd=tmp)
    assert "resuming at step 5 " in p.stderr
    assert_close_params(params(tmp, "one_to_two"), reference)


def test_sampling_split_over_two_processes(runs):
    tmp, c4, c8 = runs
    torchrun("--doc", "one", "--sample", "-o", tmp / "s2", cwd=tmp)
    samples = torch.load(tmp / "s2" / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28)  # sampling.n_samples of tiny_config, two from each rank
    assert not torch.equal(samples[:2], samples[2:])  # the ranks draw with different seeds


def test_stratified_levels_and_metrics_during_training_on_two_processes(runs):
    """One launch for two features. training.stratified_levels stratifies the global batch, drawn whole on every
    rank: 2 ranks train what 1 does. eval.every_snapshots under torchrun: rank 0 trains the classifier while
    rank 1 waits at a barrier, both draw their share of the samples, rank 0 writes metrics.json; the run ends
    (no rank left at a collective). The one-process run comes second: it finds the classifier cached."""
    import json

    tmp, c4, c8 = runs
    cfg = tiny_config(str(tmp / "data"), **{"training.batch_size": 10, "training.n_iters": 4,
                                           "training.snapshot_freq": 2, "training.stratified_levels": True,
                                           "eval.every_snapshots": 1, "eval.n_training": 6}, **PLAIN)
    strat = write_config(tmp / "strat.yml", cfg)
    p = torchrun("--config", strat, "--doc", "strat_two", cwd=tmp)
    assert "over 2 ranks" in p.stderr and "classifier trained in" in p.stderr  # by rank 0, for this launch
    records = json.load(open(tmp / "run" / "logs" / "strat_two" / "metrics.json"))
    assert [(r["step"], r["n_samples"]) for r in records] == [(2, 6), (4, 6)]
    assert all(abs(sum(r["class_shares"]) - 1) < 1e-9 for r in records)
    one_process("--config", strat, "--doc", "strat_one", cwd=tmp)
    assert_close_params(params(tmp, "strat_one"), params(tmp, "strat_two"))
