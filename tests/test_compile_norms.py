"""fast.compile_norms through the commands: the training and sampling networks have their CIN++ compiled, the run
is otherwise the eager one (a backend that runs dynamo's graphs as they are and counts them: no minutes of kernel
generation in a test)."""
import os

import torch

import main
from conftest import CPU, assert_same_weights, count_compile_norms, train_off_and_on


def test_compile_norms_switch_compiles_the_norms_and_changes_nothing_else(monkeypatch, tmp_path, fake_mnist):
    calls, graphs = count_compile_norms(monkeypatch)
    try:
        run, ckpts = train_off_and_on(tmp_path, fake_mnist, ["fast.compile_norms", "fast.channels_last"])
        assert calls == [{"dynamic": False}]  # the training network; the EMA copy stays eager
        trained_with = len(graphs)
        assert trained_with > 0  # the compiled norms ran in training
        assert main.main([*CPU, "--run", run, "--doc", "True", "--sample", "-o", str(tmp_path / "s")]) == 0
    finally:
        torch._dynamo.reset()
    assert len(calls) == 2 and len(graphs) > trained_with  # and the sampling network's, in sampling
    assert ckpts[True]["config"]["fast"]["compile_norms"] and not ckpts[False]["config"]["fast"]["compile_norms"]
    assert_same_weights(ckpts[False], ckpts[True])
    assert os.path.isfile(tmp_path / "s" / "samples.png")
