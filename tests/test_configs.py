"""The shipped recipes stay valid: configs/quick.yml trains and samples at a tiny size through main.py."""
import os

import pytest
import torch
import yaml

import main
from conftest import CPU, REPO, write_config
from schema import load_config


@pytest.mark.parametrize("name", ["config.yml", "configs/quick.yml", "configs/ncsnv2.yml"])
def test_shipped_configs_load(name):
    load_config(os.path.join(REPO, name))


def test_quick_recipe_trains_and_samples_at_a_tiny_size(tmp_path, fake_mnist):
    with open(os.path.join(REPO, "configs", "quick.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["training"].update(n_iters=4, snapshot_freq=2, test_freq=2)  # the recipe's settings, a few steps
    cfg["data"]["root"] = fake_mnist
    cfg["sampling"].update(n_samples=4, batch_size=4, n_frames=3, n_steps_each=2)
    run = str(tmp_path / "run")
    assert main.main([*CPU, "--config", write_config(tmp_path / "q.yml", cfg), "--run", run, "--doc", "quick"]) == 0
    ckpt = torch.load(os.path.join(run, "logs", "quick", "checkpoint.pth"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["ema"] is not None and ckpt["config"]["sampling"]["init"] == "gaussian"
    recipe = load_config(os.path.join(REPO, "configs", "quick.yml")).optim  # its lr, still warming up at step 4
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(recipe.lr * 4 / recipe.warmup)
    out = tmp_path / "samples"
    assert main.main([*CPU, "--run", run, "--doc", "quick", "--sample", "-o", str(out)]) == 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


def test_the_readme_lists_exactly_the_keys_a_resume_may_change():
    import re

    import checkpoint

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    block = text.split("<!-- resumable keys -->")[1].split("<!-- /resumable keys -->")[0]
    assert set(re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", block)) == checkpoint.RESUMABLE_CHANGES
