"""--eval under torchrun: the digit classifier that scores the samples is trained once, on rank 0, while the other
rank waits at a barrier and then reads the cache."""
import json
import os
import subprocess
import sys

import pytest

import main
from conftest import CPU, REPO, tiny_config, write_config

DRIVER = os.path.join(REPO, "tests", "classifier_driver.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.slow  # torchrun
def test_eval_on_two_ranks_trains_the_classifier_once(tmp_path, fake_mnist):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 2, "eval.n_samples": 6, "eval.loss_images": 8})
    run = ["--run", str(tmp_path / "run"), "--doc", "e"]
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), *run]) == 0
    assert not os.path.exists(os.path.join(fake_mnist, "MNIST", "ncsn_classifier.pth"))  # a cold cache
    p = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "--", DRIVER, *CPU, *run, "--eval"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    trained = [line for line in p.stderr.splitlines() if line.startswith("digit classifier trained on rank")]
    assert trained == ["digit classifier trained on rank 0"], p.stderr[-3000:]
    assert os.path.exists(os.path.join(fake_mnist, "MNIST", "ncsn_classifier.pth"))
    (record,) = json.load(open(tmp_path / "run" / "logs" / "e" / "metrics.json"))
    assert record["step"] == 2 and record["n_samples"] == 6  # both ranks' shares scored once
