"""The shipped recipes stay valid: configs/quick.yml trains and samples at a tiny size through main.py."""
import dataclasses
import os

import pytest
import torch
import yaml

import main
from conftest import CPU, REPO, count_compile_norms, write_config
from schema import load_config


@pytest.mark.parametrize("name", ["config.yml", "configs/quick.yml", "configs/ncsnv2.yml"])
def test_shipped_configs_load(name):
    load_config(os.path.join(REPO, name))


def test_quick_recipe_trains_and_samples_at_a_tiny_size(tmp_path, fake_mnist, monkeypatch):
    """The recipe's settings, a few steps and a small batch. Its fast.compile_norms goes through a backend that
    runs dynamo's graphs as they are: the graphs are captured as the recipe's are, without inductor's kernel
    generation (half a minute to minutes on a cold cache); inductor's kernels of CIN++ are tests/test_model.py's."""
    compiled, graphs = count_compile_norms(monkeypatch)
    with open(os.path.join(REPO, "configs", "quick.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["training"].update(n_iters=4, snapshot_freq=2, test_freq=2, batch_size=16, snapshot_grid=4,
                           snapshot_steps_each=2)
    cfg["data"]["root"] = fake_mnist
    cfg["sampling"].update(n_samples=4, batch_size=4, n_frames=3, n_steps_each=2)
    run = str(tmp_path / "run")
    try:
        assert main.main([*CPU, "--config", write_config(tmp_path / "q.yml", cfg), "--run", run, "--doc",
                          "quick"]) == 0
        ckpt = torch.load(os.path.join(run, "logs", "quick", "checkpoint.pth"), weights_only=True)
        assert ckpt["step"] == 4 and ckpt["ema"] is not None and ckpt["config"]["sampling"]["init"] == "gaussian"
        recipe = load_config(os.path.join(REPO, "configs", "quick.yml"))
        assert recipe.fast.compile_norms and recipe.fast.channels_last and ckpt["config"]["fast"] == \
            dataclasses.asdict(recipe.fast)  # the recipe's speed switches, all of them
        assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(recipe.optim.lr * 4 / recipe.optim.warmup)
        out = tmp_path / "samples"
        assert main.main([*CPU, "--run", run, "--doc", "quick", "--sample", "-o", str(out)]) == 0
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 2 and graphs  # the training network's norms, then the sampling network's; used
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


def test_the_readme_lists_exactly_the_keys_a_resume_may_change():
    import re

    import checkpoint

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text.split("<!-- resumable keys -->")[1].split("<!-- /resumable keys -->")[0]
    assert set(re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", block)) == checkpoint.RESUMABLE_CHANGES
