"""fast.compile_norms through the commands: the training and sampling networks have their CIN++ compiled, the run
is otherwise the eager one (dynamo's eager backend here: no minutes of kernel generation in a test)."""
import os

import torch

import main
from conftest import CPU, tiny_config, write_config
from model import CondRefineNetDilated


def test_compile_norms_switch_compiles_the_norms_and_changes_nothing_else(monkeypatch, tmp_path, fake_mnist):
    calls = []
    compile_norms = CondRefineNetDilated.compile_norms

    def spy(self, **options):
        calls.append(options)
        return compile_norms(self, **{**options, "backend": "eager"})

    monkeypatch.setattr(CondRefineNetDilated, "compile_norms", spy)
    run, ckpts = str(tmp_path / "run"), {}
    try:
        for flag in (False, True):
            cfg = tiny_config(fake_mnist, **{"training.n_iters": 4, "model.ema": True, "fast.compile_norms": flag,
                                             "fast.channels_last": flag})
            assert main.main([*CPU, "--config", write_config(tmp_path / f"{flag}.yml", cfg), "--run", run,
                              "--doc", str(flag)]) == 0
            ckpts[flag] = torch.load(tmp_path / "run" / "logs" / str(flag) / "checkpoint.pth", weights_only=True)
        assert calls == [{"dynamic": False}]  # the training network; the EMA copy stays eager
        assert main.main([*CPU, "--run", run, "--doc", "True", "--sample", "-o", str(tmp_path / "s")]) == 0
    finally:
        torch._dynamo.reset()
    assert len(calls) == 2  # and the sampling network
    assert ckpts[True]["config"]["fast"]["compile_norms"] and not ckpts[False]["config"]["fast"]["compile_norms"]
    for part in ("model", "ema"):
        eager, fused = ckpts[False][part], ckpts[True][part]
        assert list(fused) == list(eager)
        for key in eager:
            torch.testing.assert_close(fused[key], eager[key], rtol=1e-4, atol=1e-5, msg=f"{part} {key}")
    assert os.path.isfile(tmp_path / "s" / "samples.png")
